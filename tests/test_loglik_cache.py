"""Shared-context log-likelihood scoring: each distinct context runs once, packed with all its
continuations in one masked row; the scores must equal those of the plain per-pair path."""

import random

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from sketchtune.evaluate import loglik
from sketchtune.evaluate.loglik import choice_accuracy, encode_pairs, score_continuations
from sketchtune.evaluate.options import Choices
from tests.conftest import VOCAB, tiny_config, tiny_model

TOL = 1e-4


def _items(seed=0, n=7):
    """Token pairs of multiple-choice items: 1 to 5 options of 0 to 6 tokens after contexts of 1 to
    30 tokens, plus two items whose options split over two contexts (a merged boundary token)."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        context = [rng.randrange(2, 128) for _ in range(rng.randint(1, 30))]
        for _ in range(rng.randint(1, 5)):
            pairs.append((context, [rng.randrange(2, 128) for _ in range(rng.randint(0, 6))]))
    for head in ([5, 6, 7], [9]):
        pairs += [(head + [40], [41, 42]), (head + [40], [43]), (head + [44], []),
                  (head + [44], [45, 46, 47]), (head, [48])]
    return pairs


def _both(model, pairs, batch_size):
    shared = score_continuations(model, pairs, 1, batch_size, False, share_contexts=True)
    plain = score_continuations(model, pairs, 1, batch_size, False, share_contexts=False)
    return shared, plain


def _assert_close(shared, plain, pairs):
    for (s, ns), (p, np_), (_, continuation) in zip(shared, plain, pairs, strict=True):
        assert ns == np_ == len(continuation)
        assert s == pytest.approx(p, abs=TOL)


def _manual_logprob(model, context, continuation):
    ids = torch.tensor([context + continuation])
    logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(logprobs[len(context) - 1 + j, t].item() for j, t in enumerate(continuation))


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_shared_matches_plain_for_every_batch_size(batch_size):
    model, pairs = tiny_model(), _items(n=5)
    shared, plain = _both(model, pairs, batch_size)
    _assert_close(shared, plain, pairs)
    for (context, continuation), (s, _) in zip(pairs[:6], shared, strict=False):
        assert s == pytest.approx(_manual_logprob(model, context, continuation), abs=TOL)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma"])
def test_shared_matches_plain_in_other_families(family):
    model, pairs = tiny_model(family), _items(seed=1, n=4)
    _assert_close(*_both(model, pairs, 5), pairs)


def test_shared_matches_plain_with_eager_attention():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(), attn_implementation="eager").eval()
    pairs = _items(seed=4, n=4)
    _assert_close(*_both(model, pairs, 5), pairs)


def test_shared_matches_plain_on_a_sketched_model():
    from sketchtune.compression import SketchConfig, compress_model

    model = tiny_model()
    calibration = torch.randint(2, 97, (4, 32), generator=torch.Generator().manual_seed(1))
    compress_model(model, calibration, SketchConfig(bits=4, gpr=2), progress=False)
    pairs = _items(seed=2, n=3)
    _assert_close(*_both(model, pairs, 6), pairs)


@pytest.mark.parametrize(
    "pairs",
    [
        [([3], [4]), ([3], [5]), ([3], [6, 7])],  # one-token context
        [([3, 4, 5], [6]), ([3, 4, 5], [7]), ([8], [9]), ([8], [10])],  # one-token options only
        [([3] * 40, [4]), ([3] * 40, [5] * 9), ([6], [7, 8]), ([6], [])],  # wide pads
        [([3, 4], []), ([3, 4], [])],  # nothing to score
    ],
)
def test_padding_edge_cases(pairs):
    model = tiny_model()
    shared, plain = _both(model, pairs, 8)
    _assert_close(shared, plain, pairs)
    for (context, continuation), (s, _) in zip(pairs, shared, strict=True):
        assert s == pytest.approx(_manual_logprob(model, context, continuation), abs=TOL)


def test_each_distinct_context_runs_once():
    model = tiny_model()
    pairs = [(c, [7, 8, 9]) for c in ([3] * 20, [4] * 20) for _ in range(4)]
    fed = []
    model.model.embed_tokens.register_forward_hook(lambda m, args, out: fed.append(args[0].shape))
    score_continuations(model, pairs, 1, batch_size=8, progress=False, share_contexts=True)
    assert fed == [(2, 20 + 4 * 3)]  # one row per context, holding its four options
    fed.clear()
    score_continuations(model, pairs, 1, batch_size=8, progress=False)
    assert fed == [(8, 23)]


def _merging_tokenizer():
    """Characters, plus "ab" as one token: "xa" + "b" encodes "xab" as [x, ab], so the context's
    last token differs between the options "b" and "zz"."""
    vocab = {token: i for i, token in enumerate([*VOCAB, "ab"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("ab|."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def test_choice_accuracy_shares_by_default_and_agrees(monkeypatch):
    tokenizer = _merging_tokenizer()
    items = [
        Choices(("Q: xa",) * 4, ("b", "bc", "zz", "zzz"), gold=2),
        Choices(("Q: where?\nA:",) * 3, (" here", " there", " nowhere at all"), gold=0),
        Choices(("Ann beat Bo so Ann", "Ann beat Bo so Bo"), (" won.", " won."), gold=1),
        Choices(("Is it?\nA:",) * 2, (" yes", " no"), gold=1),
    ]
    texts = [p for item in items for p in zip(item.contexts, item.continuations, strict=True)]
    pairs = encode_pairs(tokenizer, texts)
    assert pairs[0][0][-1] == pairs[1][0][-1] == 97 and pairs[0][1] == []  # merged "ab"
    assert pairs[2][0][-1] == pairs[3][0][-1] == VOCAB.index("a")
    model = tiny_model(seed=3)
    for batch_size in (1, 3, 16):
        _assert_close(*_both(model, pairs, batch_size), pairs)
    calls = []
    packed = loglik._score_packed
    monkeypatch.setattr(loglik, "_score_packed", lambda *a: calls.append(1) or packed(*a))
    counts = choice_accuracy(model, tokenizer, items, batch_size=5, progress=False)
    assert calls
    plain = choice_accuracy(model, tokenizer, items, 5, progress=False, share_contexts=False)
    assert counts == plain
    calls.clear()
    monkeypatch.setattr(loglik, "PACKABLE", ())  # e.g. flash attention: no custom 4-D mask
    assert choice_accuracy(model, tokenizer, items, 5, progress=False) == plain and not calls


def test_plan_keeps_a_context_in_one_batch_unless_it_outgrows_it():
    pairs = [([3] * 5, [4])] * 3 + [([5] * 9, [6])] * 2 + [([7], [8])]

    def plan(batch_size):
        return [(rows, f.__name__) for rows, f in loglik._plan(pairs, batch_size, True)]

    assert plan(4) == [([3, 4], "_score_packed"), ([0, 1, 2], "_score_packed"),
                       ([5], "_score_batch")]
    assert plan(2) == [([3, 4], "_score_packed"), ([0, 1], "_score_packed"),
                       ([2], "_score_packed"), ([5], "_score_batch")]
    assert [rows for rows, _ in loglik._plan(pairs, 4, False)] == [[3, 4, 0, 1], [2, 5]]
