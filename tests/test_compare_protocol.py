"""compare --lr-grid, --seeds and the loftq row on a tiny model; seeds pooled into paired tests."""

import hashlib
import json

import pytest

from sketchtune.cli import main
from sketchtune.compare import CompareConfig, _same_run
from sketchtune.compare_methods import _base_name, sketch_calibration, split_training
from sketchtune.evaluate.stats import sign_flip_p, welch_p
from sketchtune.protocols import PRESETS, preset_config
from sketchtune.report import _plotted, table_rows
from sketchtune.significance import POOLED, comparisons, summary
from tests.test_compare import shared_data_available


def fake_row(method, seed, losses, correct):
    return {"method": method, "seed": seed,
            "heldout": {"per_item": {"loss": losses, "tokens": [2] * len(losses)}},
            "tasks": {"t": {"loglik": {"per_item": {"correct": correct}}}}}


def test_seeds_pool_per_item_before_the_paired_test():
    rows = [fake_row("sketch", 1, [1.0, 2.0, 3.0], [1, 1, 0]),
            fake_row("sketch", 2, [1.2, 2.2, 2.8], [1, 0, 0]),
            fake_row("lora", 1, [1.5, 2.0, 3.5], [0, 1, 1])]
    found = {c["metric"]: c for c in comparisons(rows)}
    nll = found["held-out NLL"]
    # per item: sketch's mean over its two seeds minus lora's one seed
    diffs = [1.1 - 1.5, 2.1 - 2.0, 2.9 - 3.5]
    assert nll["difference"] == pytest.approx(sum(diffs) / 6)
    assert nll["a_value"] == pytest.approx((1.1 + 2.1 + 2.9) / 6)
    assert nll["p"] == pytest.approx(sign_flip_p(diffs))
    acc = found["t loglik acc"]
    assert acc["difference"] == pytest.approx((1 + 0.5 + 0) / 3 - 2 / 3)
    assert acc["p"] == pytest.approx(sign_flip_p([1, -0.5, -1]))  # exact: whole numbers x2
    assert {c["verdict"] for c in found.values()} == {"within noise"}  # 3 items prove nothing
    assert nll["seed_p"] is None and nll["seed_verdict"] is None  # lora ran one seed
    means = summary(rows[:2])["held-out NLL"]
    assert means["mean"] == pytest.approx((6 / 6 + 6.2 / 6) / 2) and means["seeds"] == 2


def test_seed_level_test_sees_a_gap_that_one_lucky_seed_makes():
    # Per item, sketch is below lora on every one of 40 items (the item test: "better"), but
    # only because lora's first seed is bad; its other two seeds are below sketch's.
    sketch = [fake_row("sketch", s, [1.0 + 0.01 * s] * 40, [1] * 40) for s in range(3)]
    lora = [fake_row("lora", 0, [2.0] * 40, [1] * 40)] + [
        fake_row("lora", s, [0.9 + 0.01 * s] * 40, [1] * 40) for s in (1, 2)]
    nll = {c["metric"]: c for c in comparisons(sketch + lora)}["held-out NLL"]
    assert nll["verdict"] == "better" and nll["p"] < 1e-3
    per_seed = ([(1.0 + 0.01 * s) / 2 for s in range(3)], [1.0, 0.91 / 2, 0.92 / 2])
    assert nll["seed_p"] == pytest.approx(welch_p(*per_seed))
    assert nll["seed_verdict"] == "within noise"


def test_pooled_accuracy_counts_every_loglik_item_of_every_task_once():
    def loglik(correct):
        return {"per_item": {"correct": correct}, "accuracy": sum(correct) / len(correct),
                "acc_norm": 0.0}

    def row(method, seed, first, second):
        return {**fake_row(method, seed, [1.0], first), "heldout_nll": 0.5, "lr": 1e-3,
                "trainable_parameters": 1, "base_bytes": 1, "peak_rss_bytes": 1,
                "tasks": {"a": {"loglik": loglik(first)},
                          "b": {"loglik": loglik(second),
                                "generate": {"per_item": {"correct": [1, 1, 1]}}}}}

    rows = [row("sketch", 1, [1, 1, 0], [1, 0, 0, 0, 0, 0, 0]),
            row("sketch", 2, [1, 0, 0], [1, 1, 0, 0, 0, 0, 0]),
            row("lora", 1, [0, 0, 0], [0, 0, 0, 0, 0, 0, 0])]
    pooled = {c["metric"]: c for c in comparisons(rows)}[POOLED]
    # micro accuracy: the 3 items of a weigh 3/10, not 1/2 as a mean of task accuracies would
    assert pooled["a_value"] == pytest.approx((1 + 0.5 + 0 + 1 + 0.5) / 10)
    assert pooled["b_value"] == 0 and pooled["items"] == 10
    assert pooled["p"] == pytest.approx(sign_flip_p([2, 1, 2, 1]))  # generate items left out
    assert summary(rows[:2])[POOLED]["mean"] == pytest.approx((3 / 10 + 3 / 10) / 2)
    header, cells = table_rows({"rows": rows, "settings": {"tasks": ["a", "b"]}})
    assert [c[header.index(POOLED)] for c in cells] == ["0.300 ± 0.000", "0.000"]
    one_task = {**rows[2], "tasks": {"a": rows[2]["tasks"]["a"]}}
    assert POOLED not in {c["metric"] for c in comparisons([rows[0], one_task])}


def test_the_chart_spans_mean_plus_minus_std_over_seeds():
    rows = [fake_row("sketch", 1, [1.0, 3.0], [1, 0]), fake_row("sketch", 2, [2.0, 4.0], [1, 1])]
    (plotted,) = _plotted({"rows": rows, "settings": {"tasks": ["t"]}})
    nll_a, nll_b = 4.0 / 4, 6.0 / 4  # summed losses over 4 tokens per seed
    std = abs(nll_b - nll_a) / 2 ** 0.5  # sample std of two values
    assert plotted["heldout_nll"] == pytest.approx((nll_a + nll_b) / 2)
    low, high = plotted["heldout"]["nll_ci95"]
    assert (low, high) == pytest.approx(((nll_a + nll_b) / 2 - std, (nll_a + nll_b) / 2 + std))


def test_validation_split_is_carved_from_training_once(tiny_task_file):
    cfg = CompareConfig(model="m", data=str(tiny_task_file), tasks=["ARC-Easy"], lr_grid=True,
                        val_items=5)
    train, val = split_training(cfg)
    assert len(val) == 5 and len(train) == 31
    assert not {e.instruction for e in val} & {e.instruction for e in train}
    assert split_training(CompareConfig(**{**cfg.__dict__, "seed": 7})) == (train, val)
    assert split_training(CompareConfig(**{**cfg.__dict__, "lr_grid": False}))[1] == []


def test_calibrating_on_the_training_data_leaves_the_validation_items_out(tiny_task_file):
    cfg = CompareConfig(model="m", data=str(tiny_task_file), tasks=["ARC-Easy"], lr_grid=True,
                        val_items=5, calib=str(tiny_task_file))
    texts = sketch_calibration(cfg)
    train, val = split_training(cfg)
    assert len(texts) == len(train) == 31
    assert all(any(e.instruction in t for t in texts) for e in train)
    assert not any(e.instruction + "\n" in t for e in val for t in texts)
    assert sketch_calibration(CompareConfig(**{**cfg.__dict__, "calib": None})) is None


def test_a_new_calibration_setting_keeps_the_bases_and_rows_run_before_it(tiny_task_file):
    cfg = CompareConfig(model="m", data=str(tiny_task_file), tasks=["ARC-Easy"])
    # the name every base compressed from the shipped text had before `calib` existed
    made = {"model": "m", "bits": 4, "gpr": 4, "samples": 32, "seq_len": 512}
    digest = hashlib.sha256(json.dumps(made, sort_keys=True).encode()).hexdigest()[:12]
    assert _base_name(cfg, 4) == f"base-gpr4-{digest}"
    calibrated = CompareConfig(**{**cfg.__dict__, "calib": "gsm8k"})
    assert _base_name(calibrated, 4) != _base_name(cfg, 4)
    kept = {k: v for k, v in cfg.__dict__.items() if k != "calib"}  # a row kept before the field
    assert _same_run(kept, cfg.__dict__)
    assert not _same_run(kept, calibrated.__dict__)


def test_presets_are_the_protocols():
    math = preset_config("math", steps=5)
    assert math.steps == 5 and math.seeds == 3 and math.lr_grid
    assert {"loftq", "sketch-gpr1", "dora", "qlora"} <= set(math.methods)
    assert PRESETS["commonsense"]["limit"] == 1000
    assert len(PRESETS["commonsense"]["heldout"].split(",")) == 8
    with pytest.raises(ValueError, match="not CompareConfig fields"):
        preset_config("math", stepz=5)


@pytest.mark.skipif(not shared_data_available(), reason="needs ../shared/data")
def test_lr_grid_seeds_and_loftq_end_to_end(tiny_model_dir, tiny_task_file, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", str(tiny_model_dir), "--data", str(tiny_task_file), "--task", "ARC-Easy",
            "--methods", "dense,sketch,loftq", "--steps", "2", "--batch-size", "4",
            "--limit", "6", "--nll-limit", "4", "--samples", "2", "-o", str(out),
            "--seeds", "2", "--lr-grid", "--lr-grid-sketch", "1e-3,1e9",
            "--lr-grid-lora", "1e-4,2e-3", "--lr-grid-steps", "2", "--val-items", "6"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    search = results["lr_search"]
    assert set(search) == {"sketch", "loftq"}
    # 1e9 blows the sketch up: it can never be the rate of lowest validation NLL
    assert search["sketch"]["chosen"] == 1e-3
    assert set(search["loftq"]["validation_nll"]) == {"0.0001", "0.002"}
    nlls = search["loftq"]["validation_nll"]
    assert search["loftq"]["chosen"] == float(min(nlls, key=nlls.get))
    rows = [(r["method"], r["seed"], r["lr"]) for r in results["rows"]]
    assert rows == [("dense", 42, 0.0), ("sketch", 42, 1e-3), ("sketch", 43, 1e-3),
                    ("loftq", 42, search["loftq"]["chosen"]),
                    ("loftq", 43, search["loftq"]["chosen"])]
    loftq = [r for r in results["rows"] if r["method"] == "loftq"]
    assert loftq[0]["init_error"]["with_lora"] < loftq[0]["init_error"]["nf4"]
    assert loftq[0]["loss_curve"] != loftq[1]["loss_curve"]  # seeds differ
    pairs = {(c["a"], c["b"], c["metric"]) for c in results["comparisons"]}
    assert ("sketch", "loftq", "held-out NLL") in pairs
    assert ("sketch", "dense", "ARC-Easy loglik acc") in pairs
    md = (out / "results.md").read_text()
    assert "±" in md and "sign-flip" in md and "validation NLL by learning rate" in md
    # a third seed reruns only that seed: every kept run is reused
    args[args.index("--seeds") + 1] = "3"
    (out / "results.json").write_text(json.dumps(
        {**results, "rows": [{**r, "marker": 1} for r in results["rows"]]}))
    assert main(args) == 0
    again = json.loads((out / "results.json").read_text())["rows"]
    assert [r.get("marker") for r in again] == [1, 1, 1, None, 1, 1, None]
