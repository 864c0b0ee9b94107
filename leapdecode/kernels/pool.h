// A small work-sharing thread pool for the kernels.
//
// Why not OpenMP: a fork-join region waits at its end for every thread of the team, so when another
// process holds a core, each of the ~250 regions of a decoding step waits for a descheduled thread to be
// scheduled again. Here the caller works through the chunks itself and returns as soon as every chunk is
// done: a worker that has not started yet is simply not waited for. Which thread runs a chunk never
// changes its result.
#pragma once

#include <immintrin.h>
#include <pthread.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace ld {

using ChunkFn = void (*)(void* ctx, int64_t chunk, int worker);

class Pool {
   public:
    // fn(ctx, c, worker) for every c in [0, n), on up to `threads` threads including the caller; worker
    // ids are below `threads`. A second caller arriving while a job runs does its work alone.
    void run(int64_t n, ChunkFn fn, void* ctx, int threads) {
        std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
        if (threads <= 1 || n <= 1 || !busy.owns_lock()) {
            for (int64_t c = 0; c < n; ++c) fn(ctx, c, 0);
            return;
        }
        grow(threads - 1);
        const uint64_t g = ++gen_;
        fn_.store(fn, std::memory_order_relaxed);
        ctx_.store(ctx, std::memory_order_relaxed);
        n_.store(n, std::memory_order_relaxed);
        threads_.store(threads, std::memory_order_relaxed);
        done_.store(0, std::memory_order_relaxed);
        next_.store(g << 32, std::memory_order_seq_cst);  // publish: generation g, chunk 0
        if (sleepers_.load(std::memory_order_seq_cst) > 0) {
            std::lock_guard<std::mutex> lk(sleep_mu_);
            sleep_cv_.notify_all();
        }
        drain(g, 0);
        const auto t0 = std::chrono::steady_clock::now();
        while (done_.load(std::memory_order_acquire) < n) {  // only chunks a worker has started remain
            if (std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(50))
                std::this_thread::yield();
            else
                _mm_pause();
        }
        next_.store((g << 32) | kClosed, std::memory_order_release);
    }

    static Pool& get() {
        static Pool* pool = make();
        if (reset_.exchange(false)) pool = new Pool();  // after fork: the old threads are gone (leaked)
        return *pool;
    }

   private:
    static constexpr uint64_t kClosed = 0xffffffffull;  // chunk index of a finished job
    static constexpr auto kSpin = std::chrono::microseconds(200);  // idle spinning before sleeping

    std::atomic<uint64_t> next_{kClosed};  // (generation << 32) | next chunk
    std::atomic<int64_t> done_{0};
    std::atomic<ChunkFn> fn_{nullptr};
    std::atomic<void*> ctx_{nullptr};
    std::atomic<int64_t> n_{0};
    std::atomic<int> threads_{1};
    std::atomic<int> sleepers_{0};
    uint64_t gen_ = 0;
    std::mutex run_mu_, sleep_mu_;
    std::condition_variable sleep_cv_;
    std::vector<std::thread> workers_;
    static inline std::atomic<bool> reset_{false};

    static Pool* make() {
        pthread_atfork(nullptr, nullptr, [] { reset_.store(true); });
        return new Pool();
    }

    void grow(int n) {
        while ((int)workers_.size() < n) {
            workers_.emplace_back(&Pool::work, this, (int)workers_.size() + 1);
            workers_.back().detach();
        }
    }

    // Claim and run chunks of generation g until none is left. A claim succeeds only while g is the
    // open job, so the descriptor read before it is g's.
    void drain(uint64_t g, int id) {
        uint64_t v = next_.load(std::memory_order_acquire);
        for (;;) {
            if ((v >> 32) != g || (v & kClosed) >= (uint64_t)n_.load(std::memory_order_relaxed)) return;
            const ChunkFn fn = fn_.load(std::memory_order_relaxed);
            void* ctx = ctx_.load(std::memory_order_relaxed);
            if (next_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
                fn(ctx, (int64_t)(v & kClosed), id);
                done_.fetch_add(1, std::memory_order_release);
                v = next_.load(std::memory_order_acquire);
            }
        }
    }

    void work(int id) {
        uint64_t seen = 0;
        auto idle = std::chrono::steady_clock::now();
        for (;;) {
            const uint64_t g = next_.load(std::memory_order_acquire) >> 32;
            if (g != seen) {
                seen = g;
                if (id < threads_.load(std::memory_order_relaxed)) drain(g, id);
                idle = std::chrono::steady_clock::now();
                continue;
            }
            const auto waited = std::chrono::steady_clock::now() - idle;
            if (waited < kSpin) {  // stay hot between the layers of a forward, yielding to other work
                if (waited < kSpin / 8)
                    _mm_pause();
                else
                    std::this_thread::yield();
                continue;
            }
            std::unique_lock<std::mutex> lk(sleep_mu_);
            sleepers_.fetch_add(1, std::memory_order_seq_cst);
            sleep_cv_.wait(lk, [&] { return next_.load(std::memory_order_seq_cst) >> 32 != seen; });
            sleepers_.fetch_sub(1, std::memory_order_seq_cst);
            idle = std::chrono::steady_clock::now();
        }
    }
};

}  // namespace ld
