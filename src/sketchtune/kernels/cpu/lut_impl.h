// Kernel templates shared by the ISA files. Each ISA file includes this after its target pragma,
// so everything here has internal linkage: no copy compiled for one ISA can stand in for another.
//
// An ISA type I provides the vector type V of W floats (zero, load, fma, add, hsum) and, per bit
// width, two chunk policies: Big<BITS> for the GEMV body and Small<BITS> (natural column order)
// for what big chunks leave at a group's end (or near the end of the codes); NoChunk where absent.
// It may add BigBf16<BITS> and SmallBf16<BITS>, policies that read bf16 tables directly; without
// them, the bf16 GEMV widens each (row, group) table to fp32 for Big<BITS> and Small<BITS>. It may
// add widen_bf16<K>, a faster way to widen K bf16 entries.
// A chunk policy P turns the bytes of P::L codes, starting at a column whose code starts a byte,
// into P::L / W vectors of weights:
//   L, LOAD (bytes a read may touch), Entry (float, or uint16_t for bf16 bits), T (its table),
//   table(entries), lookup(t, bytes, out[]), lane_column(i) (column of the i-th weight of out[]
//   within the chunk), store(t, bytes, out) (the L weights in column order; needed of the policy
//   that dequantize uses). A policy whose chunk yields more vectors than registers hold may
//   instead give PARTS and lookup_part(t, bytes, part, out[]) (vectors part * L / W / PARTS on),
//   so that the GEMV multiplies each part before looking up the next.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "dense_bf16.h"
#include "lut_kernels.h"

namespace sketchtune {
namespace {

struct NoChunk {
  static constexpr int L = 0, LOAD = 0;
  using Entry = float;
  static int lane_column(int lane) { return lane; }
};

// out[k] = in[k] as fp32 for k < K: I::widen_bf16<K> where I has one, else one entry at a time.
template <class I, int K, class = void>
struct Widen {
  static void run(const uint16_t* in, float* out) {
    for (int k = 0; k < K; ++k) out[k] = bf16_to_float(in[k]);
  }
};
template <class I, int K>
struct Widen<I, K, std::void_t<decltype(&I::template widen_bf16<K>)>> {
  static void run(const uint16_t* in, float* out) { I::template widen_bf16<K>(in, out); }
};

// The GEMV body policy for tables of type Tab: I::BigBf16<BITS> where I has one for bf16.
template <class I, int BITS, class Tab, class = void>
struct BodyPolicy {
  using type = typename I::template Big<BITS>;
};
template <class I, int BITS>
struct BodyPolicy<I, BITS, uint16_t, std::void_t<typename I::template BigBf16<BITS>>> {
  using type = typename I::template BigBf16<BITS>;
};
template <class I, int BITS, class Tab>
using Body = typename BodyPolicy<I, BITS, Tab>::type;

// The GEMV's small-chunk policy: I::SmallBf16<BITS> for bf16 tables where I has one.
template <class I, int BITS, class Tab, class = void>
struct TailPolicy {
  using type = typename I::template Small<BITS>;
};
template <class I, int BITS>
struct TailPolicy<I, BITS, uint16_t, std::void_t<typename I::template SmallBf16<BITS>>> {
  using type = typename I::template SmallBf16<BITS>;
};
template <class I, int BITS, class Tab>
using Tail = typename TailPolicy<I, BITS, Tab>::type;

// The entries a policy P reads: the tables as stored if P reads their type, else fp32 ones.
template <class P, class Tab>
const typename P::Entry* entries_for(const Tab* stored, const float* fp32) {
  if constexpr (std::is_same_v<typename P::Entry, Tab>)
    return stored;
  else
    return fp32;
}

template <class Tab>
const Tab* tables_of(const Sketch& s) {
  if constexpr (std::is_same_v<Tab, float>)
    return s.values;
  else
    return s.values_bf16;
}

template <int BITS>
inline int code_at(const uint8_t* row, int64_t c) {
  const int64_t bit = c * BITS;
  const int shift = static_cast<int>(bit & 7);
  unsigned v = row[bit >> 3];
  if (BITS == 3 && shift > 5) v |= unsigned(row[(bit >> 3) + 1]) << 8;  // straddles two bytes
  return static_cast<int>(v >> shift) & ((1 << BITS) - 1);
}

// 16 codes from a chunk as one word: codes 0-7 in the low 32 bits, codes 8-15 in the high 32.
template <int BITS>
inline uint64_t chunk_pair(const uint8_t* p) {
  uint64_t w;
  std::memcpy(&w, p, 8);
  if constexpr (BITS == 4) {
    return w;
  } else {
    constexpr int half = 8 * BITS;
    constexpr uint64_t mask = (uint64_t(1) << half) - 1;
    return (w & mask) | (((w >> half) & mask) << 32);
  }
}

// acc[b] += sum over c in [c0, c1) of table[code(c)] * x[b, c].
template <int BITS, int NB>
inline void scalar_dot(const uint8_t* row, const float* table, const float* x, int64_t d_in,
                       int64_t c0, int64_t c1, float* acc) {
  for (int64_t c = c0; c < c1; ++c) {
    const float w = table[code_at<BITS>(row, c)];
    for (int b = 0; b < NB; ++b) acc[b] += w * x[b * d_in + c];
  }
}

template <int BITS>
inline void scalar_dequant(const uint8_t* row, const float* table, int64_t c0, int64_t c1,
                           float* out) {
  for (int64_t c = c0; c < c1; ++c) out[c - c0] = table[code_at<BITS>(row, c)];
}

// How [c0, c1) is covered: scalar [c0, b0), big [b0, b1), small [b1, s1), scalar [s1, c1). Big
// chunks follow each other from the first byte-aligned column (the GEMV's lane order of x assumes
// exactly these positions, see `body_chunk_start`); a chunk is used only if its reads stay within
// `bytes_left` of c0's row start, and small chunks take what big ones leave.
struct Split {
  int64_t b0, b1, s1;
};

template <class Big, class Small, int BITS>
inline Split split(int64_t c0, int64_t c1, int64_t bytes_left) {
  constexpr int B = Big::L, S = Small::L;
  // last start column of a chunk of n codes that reads at most `load` bytes
  auto last = [&](int n, int load) {
    const int64_t by_bytes = bytes_left >= load ? (bytes_left - load) * 8 / BITS : -1;
    return std::min(c1 - n, by_bytes);
  };
  auto count = [](int64_t c, int64_t lim, int n) { return c <= lim ? (lim - c) / n + 1 : 0; };
  const int64_t b0 = std::min(c1, body_chunk_start(c0, BITS));
  int64_t b1 = b0, s1 = b0;
  if constexpr (B > 0) b1 = s1 = b0 + count(b0, last(B, Big::LOAD), B) * B;
  if constexpr (S > 0) s1 = b1 + count(b1, last(S, Small::LOAD), S) * S;
  return {b0, b1, s1};
}

// A chunk's lookup in Parts<P>::N steps: P::lookup_part where P gives PARTS, else one lookup.
template <class P, class = void>
struct Parts {
  static constexpr int N = 1;
  template <class V>
  static void lookup(const typename P::T& t, const uint8_t* p, int, V* out) {
    P::lookup(t, p, out);
  }
};
template <class P>
struct Parts<P, std::void_t<decltype(P::PARTS)>> {
  static constexpr int N = P::PARTS;
  template <class V>
  static void lookup(const typename P::T& t, const uint8_t* p, int part, V* out) {
    P::lookup_part(t, p, part, out);
  }
};

// acc += weights of chunks in [c0, c1) times x (x in P's lane order), NB activation rows.
template <class I, class P, int BITS, int NB, int NACC>
inline void chunk_dot(const typename P::T& t, const uint8_t* row, const float* x, int64_t d_in,
                      int64_t c0, int64_t c1, typename I::V (&out)[NACC][NB]) {
  using V = typename I::V;
  constexpr int VPC = P::L / I::W;                // vectors per chunk
  constexpr int U = VPC >= NACC ? 1 : NACC / VPC;  // chunks per step: NACC independent chains
  constexpr int BYTES = P::L * BITS / 8;
  constexpr int VPP = VPC / Parts<P>::N;  // vectors per part
  const uint8_t* p = row + ((c0 * BITS) >> 3);
  const float* xc = x + c0;
  V acc[NACC][NB];  // a local copy the compiler keeps in registers
  for (int k = 0; k < NACC; ++k)
    for (int b = 0; b < NB; ++b) acc[k][b] = out[k][b];
  int64_t c = c0;
  for (; c + U * P::L <= c1; c += U * P::L, p += U * BYTES, xc += U * P::L) {
    for (int u = 0; u < U; ++u) {
      for (int part = 0; part < Parts<P>::N; ++part) {
        V w[VPP];
        Parts<P>::lookup(t, p + u * BYTES, part, w);
        for (int i = 0; i < VPP; ++i) {
          const int j = part * VPP + i, k = (u * VPC + j) % NACC;
          for (int b = 0; b < NB; ++b)
            acc[k][b] = I::fma(w[i], I::load(xc + b * d_in + u * P::L + j * I::W), acc[k][b]);
        }
      }
    }
  }
  for (int k = 0; k < NACC; ++k)
    for (int b = 0; b < NB; ++b) out[k][b] = acc[k][b];
  for (; c < c1; c += P::L, p += BYTES, xc += P::L) {  // fewer than U chunks left
    for (int part = 0; part < Parts<P>::N; ++part) {
      V w[VPP];
      Parts<P>::lookup(t, p, part, w);
      for (int i = 0; i < VPP; ++i) {
        const int j = part * VPP + i;
        for (int b = 0; b < NB; ++b)
          out[j % NACC][b] = I::fma(w[i], I::load(xc + b * d_in + j * I::W), out[j % NACC][b]);
      }
    }
  }
}

// Two weight rows against one activation row (decode) through the same chunks: the rows share
// the loop and its bookkeeping, and their NACC chains each interleave.
template <class I, class P, int BITS, int NACC>
inline void chunk_dot_pair(const typename P::T& t0, const typename P::T& t1, const uint8_t* row0,
                           const uint8_t* row1, const float* x, int64_t c0, int64_t c1,
                           typename I::V (&acc0)[NACC], typename I::V (&acc1)[NACC]) {
  using V = typename I::V;
  constexpr int VPP = P::L / I::W / Parts<P>::N;  // vectors per part
  constexpr int BYTES = P::L * BITS / 8;
  const int64_t start = (c0 * BITS) >> 3;
  const uint8_t *p0 = row0 + start, *p1 = row1 + start;
  const float* xc = x + c0;
  V s0[NACC], s1[NACC];  // local copies the compiler keeps in registers
  for (int k = 0; k < NACC; ++k) s0[k] = acc0[k], s1[k] = acc1[k];
  for (int64_t c = c0; c < c1; c += P::L, p0 += BYTES, p1 += BYTES, xc += P::L) {
    for (int part = 0; part < Parts<P>::N; ++part) {
      V w[VPP];  // one row's part at a time: x is read twice from L1, no register holds it
      Parts<P>::lookup(t0, p0, part, w);
      for (int i = 0; i < VPP; ++i) {
        const int j = part * VPP + i;
        s0[j % NACC] = I::fma(w[i], I::load(xc + j * I::W), s0[j % NACC]);
      }
      Parts<P>::lookup(t1, p1, part, w);
      for (int i = 0; i < VPP; ++i) {
        const int j = part * VPP + i;
        s1[j % NACC] = I::fma(w[i], I::load(xc + j * I::W), s1[j % NACC]);
      }
    }
  }
  for (int k = 0; k < NACC; ++k) acc0[k] = s0[k], acc1[k] = s1[k];
}

// The fp32 entries of one (row, group) table for the parts of `sp` that read fp32 (`entries`
// themselves if fp32, else widened into `widened`); nullptr where bf16 policies cover the group.
template <class I, class Big, class Small, int K, class Tab>
inline const float* fp32_entries(const Tab* entries, const Split& sp, int64_t c0, int64_t c1,
                                 float* widened) {
  if constexpr (std::is_same_v<Tab, float>) {
    return entries;
  } else {
    if (!std::is_same_v<typename Big::Entry, Tab> || sp.b0 > c0 || sp.s1 < c1 ||
        (!std::is_same_v<typename Small::Entry, Tab> && sp.s1 > sp.b1)) {
      Widen<I, K>::run(entries, widened);
      return widened;
    }
    return nullptr;
  }
}

// Asks for row r's codes and tables ahead of use. A decode step reads each layer once, from
// DRAM: without this the GEMV waits on one cache line after another (latency, not bandwidth).
template <class Tab>
inline void prefetch_row(const Sketch& s, const Tab* tables, int64_t r) {
  if (r >= s.d_out) return;
  const int64_t rb = s.row_bytes(), table_bytes = s.gpr * (int64_t{1} << s.bits) * sizeof(Tab);
  const char* codes = reinterpret_cast<const char*>(s.codes + r * rb);
  const char* table = reinterpret_cast<const char*>(tables + r * s.gpr * (int64_t{1} << s.bits));
  for (int64_t off = 0; off < rb; off += 64) __builtin_prefetch(codes + off);
  for (int64_t off = 0; off < table_bytes; off += 64) __builtin_prefetch(table + off);
}

constexpr int64_t kPrefetchRows = 8;  // about 4 row pairs of work ahead of DRAM latency

template <class I, int BITS, int NB, class Tab>
void gemv_rows(const Sketch& s, const GemvArgs& a, int64_t r0, int64_t r1) {
  using V = typename I::V;
  using Big = Body<I, BITS, Tab>;
  using Small = Tail<I, BITS, Tab>;
  constexpr int K = 1 << BITS;
  constexpr int NACC = NB >= 4 ? 1 : 4 / NB;  // FMA chains per activation row: 4 or more in all
  const int64_t n = s.d_in, group = s.group(), rb = s.row_bytes();
  const Tab* tables = tables_of<Tab>(s);
  // A split depends on the row only through how far a chunk's read may reach past the row's end;
  // rows with at least kFar bytes after their end all split alike, so those splits are made once.
  constexpr int64_t kFar = 64;  // more than any chunk's LOAD
  Split far[8];
  for (int64_t g = 0; g < s.gpr && g < 8; ++g)
    far[g] = split<Big, Small, BITS>(g * group, (g + 1) * group, rb + kFar);
  auto is_far = [&](int64_t r) { return (s.d_out - r) * rb >= rb + kFar && s.gpr <= 8; };
  for (int64_t r = r0; r < std::min(r1, r0 + kPrefetchRows); ++r) prefetch_row(s, tables, r);
  int64_t r = r0;
  if constexpr (NB == 1) {  // decode: rows in pairs while both are far from the codes' end
    for (; r + 1 < r1 && is_far(r + 1); r += 2) {
      prefetch_row(s, tables, r + kPrefetchRows);
      prefetch_row(s, tables, r + kPrefetchRows + 1);
      const uint8_t *row0 = s.codes + r * rb, *row1 = row0 + rb;
      V acc0[2] = {I::zero(), I::zero()}, acc1[2] = {I::zero(), I::zero()};
      float rest0 = 0, rest1 = 0;
      for (int64_t g = 0; g < s.gpr; ++g) {
        const int64_t c0 = g * group, c1 = c0 + group;
        const Split& sp = far[g];
        const Tab* e0 = tables + (r * s.gpr + g) * K;
        const Tab* e1 = e0 + s.gpr * K;
        float widened0[K], widened1[K];
        const float* f0 = fp32_entries<I, Big, Small, K>(e0, sp, c0, c1, widened0);
        const float* f1 = fp32_entries<I, Big, Small, K>(e1, sp, c0, c1, widened1);
        scalar_dot<BITS, 1>(row0, f0, a.x, n, c0, sp.b0, &rest0);
        scalar_dot<BITS, 1>(row1, f1, a.x, n, c0, sp.b0, &rest1);
        if constexpr (Big::L > 0)
          chunk_dot_pair<I, Big, BITS>(Big::table(entries_for<Big>(e0, f0)),
                                       Big::table(entries_for<Big>(e1, f1)), row0, row1,
                                       a.x_lane, sp.b0, sp.b1, acc0, acc1);
        if constexpr (Small::L > 0)
          if (sp.s1 > sp.b1)
            chunk_dot_pair<I, Small, BITS>(Small::table(entries_for<Small>(e0, f0)),
                                           Small::table(entries_for<Small>(e1, f1)), row0, row1,
                                           a.x, sp.b1, sp.s1, acc0, acc1);
        scalar_dot<BITS, 1>(row0, f0, a.x, n, sp.s1, c1, &rest0);
        scalar_dot<BITS, 1>(row1, f1, a.x, n, sp.s1, c1, &rest1);
      }
      a.y[r] = I::hsum(I::add(acc0[0], acc0[1])) + rest0;
      a.y[r + 1] = I::hsum(I::add(acc1[0], acc1[1])) + rest1;
    }
  }
  for (; r < r1; ++r) {
    prefetch_row(s, tables, r + kPrefetchRows);
    const uint8_t* row = s.codes + r * rb;
    const bool near_end = !is_far(r);
    V acc[NACC][NB];
    for (auto& chain : acc)
      for (auto& v : chain) v = I::zero();
    float rest[NB] = {};
    for (int64_t g = 0; g < s.gpr; ++g) {
      const int64_t c0 = g * group, c1 = c0 + group;
      const Split sp = near_end ? split<Big, Small, BITS>(c0, c1, (s.d_out - r) * rb) : far[g];
      const Tab* entries = tables + (r * s.gpr + g) * K;
      float widened[K];
      const float* table = fp32_entries<I, Big, Small, K>(entries, sp, c0, c1, widened);
      scalar_dot<BITS, NB>(row, table, a.x, n, c0, sp.b0, rest);
      if constexpr (Big::L > 0)
        chunk_dot<I, Big, BITS, NB>(Big::table(entries_for<Big>(entries, table)), row, a.x_lane,
                                    n, sp.b0, sp.b1, acc);
      if constexpr (Small::L > 0)
        if (sp.s1 > sp.b1)
          chunk_dot<I, Small, BITS, NB>(Small::table(entries_for<Small>(entries, table)), row,
                                        a.x, n, sp.b1, sp.s1, acc);
      scalar_dot<BITS, NB>(row, table, a.x, n, sp.s1, c1, rest);
    }
    for (int b = 0; b < NB; ++b) {
      V sum = acc[0][b];
      for (int k = 1; k < NACC; ++k) sum = I::add(sum, acc[k][b]);
      a.y[b * a.ldy + r] = I::hsum(sum) + rest[b];
    }
  }
}

template <class I, int BITS>
void dequant_rows(const Sketch& s, int64_t r0, int64_t r1, int64_t c0, int64_t c1, float* out,
                  int64_t ldo) {
  using Small = typename I::template Small<BITS>;
  using P = std::conditional_t<(Small::L > 0), Small, typename I::template Big<BITS>>;
  constexpr int K = 1 << BITS;
  const int64_t group = s.group(), rb = s.row_bytes();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = s.codes + r * rb;
    float* o = out + (r - r0) * ldo - c0;  // o[c]: column c
    for (int64_t g = c0 / group; g * group < c1; ++g) {
      const float* table = s.values + (r * s.gpr + g) * K;
      const int64_t lo = std::max(c0, g * group), hi = std::min(c1, (g + 1) * group);
      const Split sp = split<P, NoChunk, BITS>(lo, hi, (s.d_out - r) * rb);
      scalar_dequant<BITS>(row, table, lo, sp.b0, o + lo);
      if constexpr (P::L > 0) {
        const auto t = P::table(table);
        for (int64_t c = sp.b0; c < sp.b1; c += P::L) P::store(t, row + ((c * BITS) >> 3), o + c);
      }
      scalar_dequant<BITS>(row, table, sp.b1, hi, o + sp.b1);
    }
  }
}

template <class I, int BITS, class Tab>
void gemv_bits(const Sketch& s, const GemvArgs& a, int64_t r0, int64_t r1) {
  static_assert(kGemvRows == 4, "one instantiation per activation row count");
  switch (a.nb) {
    case 1: return gemv_rows<I, BITS, 1, Tab>(s, a, r0, r1);
    case 2: return gemv_rows<I, BITS, 2, Tab>(s, a, r0, r1);
    case 3: return gemv_rows<I, BITS, 3, Tab>(s, a, r0, r1);
    default: return gemv_rows<I, BITS, 4, Tab>(s, a, r0, r1);
  }
}

template <class I, class Tab>
void gemv(const Sketch& s, const GemvArgs& a, int64_t r0, int64_t r1) {
  switch (s.bits) {
    case 2: return gemv_bits<I, 2, Tab>(s, a, r0, r1);
    case 3: return gemv_bits<I, 3, Tab>(s, a, r0, r1);
    default: return gemv_bits<I, 4, Tab>(s, a, r0, r1);
  }
}

template <class I>
void dequant(const Sketch& s, int64_t r0, int64_t r1, int64_t c0, int64_t c1, float* out,
             int64_t ldo) {
  switch (s.bits) {
    case 2: return dequant_rows<I, 2>(s, r0, r1, c0, c1, out, ldo);
    case 3: return dequant_rows<I, 3>(s, r0, r1, c0, c1, out, ldo);
    default: return dequant_rows<I, 4>(s, r0, r1, c0, c1, out, ldo);
  }
}

template <class P>
const int* lane_columns() {
  static int columns[P::L > 0 ? P::L : 1] = {};
  for (int i = 0; i < P::L; ++i) columns[i] = P::lane_column(i);
  return columns;
}

template <class I, class Tab>
Gemv gemv_for() {
  return {{0, 0, Body<I, 2, Tab>::L, Body<I, 3, Tab>::L, Body<I, 4, Tab>::L},
          {nullptr, nullptr, lane_columns<Body<I, 2, Tab>>(), lane_columns<Body<I, 3, Tab>>(),
           lane_columns<Body<I, 4, Tab>>()},
          &gemv<I, Tab>};
}

template <class I>
const Kernels* make_kernels(const char* name) {
  static const Kernels k{name, gemv_for<I, float>(), gemv_for<I, uint16_t>(), &dequant<I>,
                         &bf16_gemv<I>};
  return &k;
}

}  // namespace
}  // namespace sketchtune
