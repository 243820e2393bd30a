// Blocks of rows shared out among the calling thread and persistent helper threads, where the
// caller never waits for a helper that has not started. A fork-join region (OpenMP's, behind
// at::parallel_for) ends at a barrier that waits for every thread: on a machine whose other jobs
// deschedule one of ours, each of a decode token's ~200 calls then waits out a scheduler time
// slice (SmolLM2 with two threads beside two busy processes: ~0.3 tokens/s against ~9 with one
// thread). Here a helper that wakes late finds no blocks left; the caller waits only for blocks a
// helper has claimed, and does the rest itself.
#pragma once

#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace sketchtune {

class RowPool {
 public:
  // fn(block) for every block in [0, blocks), on the caller and up to `helpers` helper threads.
  template <class F>
  void run(int64_t blocks, int helpers, const F& fn) {
    // On the heap: a helper may still hold the job after this returns (it then claims nothing).
    auto job = std::make_shared<Job>();
    job->run = [](const void* f, int64_t b) { (*static_cast<const F*>(f))(b); };
    job->fn = &fn;
    job->blocks = blocks;
    job->helpers = helpers;
    publish(job, helpers);
    work(*job);
    // Every claimed block counts itself done: wait for those only. `fn` is called for claimed
    // blocks alone, so once all are done no helper touches it.
    for (int i = 0; job->done.load(std::memory_order_acquire) < blocks; ++i)
      if (i < kSpins) pause(); else std::this_thread::yield();  // let a descheduled helper run
  }

  static RowPool& instance() {
    static std::once_flag once;
    std::call_once(once, [] { pthread_atfork(nullptr, nullptr, [] { g_pool = new RowPool; }); });
    if (g_pool == nullptr) g_pool = new RowPool;  // never destroyed: helpers are detached
    return *g_pool;
  }

 private:
  struct Job {
    void (*run)(const void*, int64_t) = nullptr;
    const void* fn = nullptr;
    int64_t blocks = 0;
    std::atomic<int64_t> next{0}, done{0};
    std::atomic<int> helpers{0};  // how many helpers may still join
  };

  static inline RowPool* g_pool = nullptr;  // replaced in a forked child: no helpers there
  static constexpr int kSpins = 1 << 14;  // ~100 µs of polling before sleeping: decode's calls
                                          // come a few µs to tens of µs apart

  static void pause() {
#if defined(__x86_64__)
    _mm_pause();
#else
    std::this_thread::yield();
#endif
  }

  static void work(Job& job) {
    for (int64_t b; (b = job.next.fetch_add(1, std::memory_order_relaxed)) < job.blocks;) {
      job.run(job.fn, b);
      job.done.fetch_add(1, std::memory_order_release);
    }
  }

  void publish(const std::shared_ptr<Job>& job, int helpers) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (; started_ < helpers; ++started_) std::thread([this] { helper(); }).detach();
    current_ = job;
    generation_.fetch_add(1, std::memory_order_release);
    wake_.notify_all();
  }

  void helper() {
    uint64_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      for (int i = 0; i < kSpins && generation_.load(std::memory_order_acquire) == seen; ++i)
        pause();
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        seen = generation_.load(std::memory_order_acquire);
        job = current_;
      }
      if (job && job->helpers.fetch_sub(1, std::memory_order_relaxed) > 0) work(*job);
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::shared_ptr<Job> current_;
  int started_ = 0;  // helper threads started
};

}  // namespace sketchtune
