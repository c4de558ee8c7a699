// The fiber scheduler behind cuda_emu.h: runs a grid's blocks one after another on the calling OS
// thread, each CUDA thread of a block as a fiber with its own small stack.
//
// A fiber runs one CUDA thread to completion, then takes the next thread that has not started, so a
// block without barriers costs one context switch in total. A thread that reaches a barrier keeps
// its fiber (and stack) and switches back to the scheduler; the scheduler starts the remaining
// threads on other fibers, then releases every barrier whose participants have all arrived
// (exchanging shuffle values on the way) and resumes those threads in thread order. Stacks are
// allocated once (mmap, with a guard page below) and reused by every block and launch.
//
// Context switch: a few lines of x86-64 assembly (callee-saved registers, MXCSR and the x87 control
// word) because glibc's swapcontext makes a signal-mask system call on every switch; other
// architectures, or -DFB_EMU_UCONTEXT, use ucontext.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <exception>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#if !defined(__x86_64__) || defined(FB_EMU_UCONTEXT)
#define FB_EMU_USE_UCONTEXT 1
#include <ucontext.h>
#endif

FB_EMU_HIDDEN uint3 threadIdx;
FB_EMU_HIDDEN uint3 blockIdx;
FB_EMU_HIDDEN dim3 blockDim;
FB_EMU_HIDDEN dim3 gridDim;

#ifndef FB_EMU_USE_UCONTEXT
extern "C" {
// Saves the callee-saved state on the current stack, stores the stack pointer in *save_sp and
// continues on load_sp (a stack saved by an earlier call, or one prepared by init_fiber_stack).
FB_EMU_HIDDEN void fb_emu_switch(void** save_sp, void* load_sp);
// First code a new fiber runs: calls r13(r12), which never returns.
FB_EMU_HIDDEN void fb_emu_fiber_start();
}
asm(R"(
  .pushsection .text
  .globl fb_emu_switch
  .hidden fb_emu_switch
  .type fb_emu_switch, @function
fb_emu_switch:
  .cfi_startproc
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .cfi_endproc
  .size fb_emu_switch, .-fb_emu_switch

  .globl fb_emu_fiber_start
  .hidden fb_emu_fiber_start
  .type fb_emu_fiber_start, @function
fb_emu_fiber_start:
  .cfi_startproc
  .cfi_undefined rip
  movq %r12, %rdi
  callq *%r13
  ud2
  .cfi_endproc
  .size fb_emu_fiber_start, .-fb_emu_fiber_start
  .popsection
)");
#endif

namespace fb_emu {

void fail(const std::string& message) { throw std::runtime_error(message); }

namespace {

constexpr size_t kStackBytes = 256 * 1024;  // kernels keep small register tiles; 256 KiB is plenty
constexpr int kMaxThreadsPerBlock = 1024;
constexpr size_t kMaxDynamicSmemBytes = 227 * 1024;  // the largest opt-in size of current GPUs
constexpr uint64_t kPoison = ~0ull;                   // what a shuffle reads from a missing lane

enum ThreadStatus : uint8_t { kUnstarted, kRunning, kAtBlockBarrier, kAtWarpBarrier, kReleased, kDone };

struct Fiber {
  void* sp = nullptr;  // saved stack pointer while suspended
  char* mapping = nullptr;
  size_t mapping_bytes = 0;
#ifdef FB_EMU_USE_UCONTEXT
  ucontext_t context;
#endif
};

// One queued cp.async of a thread: performed by the wait_group that covers its group.
struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes, src_bytes;
  long long group;  // the thread's open group when it was issued
};

struct ThreadState {
  ThreadStatus status;
  WarpOp op;
  int arg, width;
  uint64_t value, result;
  int arrived;  // threads at the block barrier when it was released (__syncthreads_and)
  Fiber* fiber;
  // warp_all_gather: what this lane posts and where it receives the warp's posts.
  const void* gather_in;
  void* gather_out;
  size_t gather_bytes;
  // cp.async: copies not yet performed, in issue order, and the group new copies join (commit
  // closes it: groups < open_group are committed).
  std::vector<AsyncCopy> async_copies;
  long long open_group;
};

struct Scheduler {
  std::mutex mutex;
  std::vector<Fiber*> fibers, idle;
#ifdef FB_EMU_USE_UCONTEXT
  ucontext_t scheduler_context;
#else
  void* scheduler_sp = nullptr;
#endif
  // The launch in progress.
  const char* kernel_name = "";
  KernelBody body = nullptr;
  void* payload = nullptr;
  unsigned char* dynamic_smem = nullptr;
  int block_threads = 0;
  int next_unstarted = 0, live = 0, at_block_barrier = 0;
  std::vector<ThreadState> threads;
  std::vector<int> warp_live, warp_waiting;
  int current_thread = -1;
  Fiber* current_fiber = nullptr;
  bool failed = false;
  std::string failure;
};

Scheduler& sched() {
  static Scheduler* s = new Scheduler();  // never destroyed: fibers may outlive static destruction order
  return *s;
}

thread_local bool tls_in_launch = false;
bool g_serial_warps = false;  // set_serial_warps
int g_cp_async_wait_slack = 0;  // set_cp_async_wait_slack

void set_thread_registers(int t) {
  threadIdx.x = (unsigned)t % blockDim.x;
  threadIdx.y = ((unsigned)t / blockDim.x) % blockDim.y;
  threadIdx.z = (unsigned)t / (blockDim.x * blockDim.y);
}

std::string where(int t) {
  std::ostringstream os;
  os << "block (" << blockIdx.x << "," << blockIdx.y << "," << blockIdx.z << ")";
  if (t >= 0) {
    set_thread_registers(t);
    os << " thread (" << threadIdx.x << "," << threadIdx.y << "," << threadIdx.z << ")";
  }
  return os.str();
}

void fiber_main(Fiber* self);

#ifdef FB_EMU_USE_UCONTEXT
void fiber_entry(unsigned lo, unsigned hi) {
  fiber_main(reinterpret_cast<Fiber*>((uintptr_t)lo | ((uintptr_t)hi << 32)));
}
#endif

void init_fiber_stack(Fiber* f) {
  char* top = f->mapping + f->mapping_bytes;
#ifdef FB_EMU_USE_UCONTEXT
  getcontext(&f->context);
  f->context.uc_stack.ss_sp = f->mapping + getpagesize();
  f->context.uc_stack.ss_size = f->mapping_bytes - getpagesize();
  f->context.uc_link = nullptr;
  uintptr_t p = reinterpret_cast<uintptr_t>(f);
  makecontext(&f->context, (void (*)())fiber_entry, 2, (unsigned)(p & 0xffffffffu), (unsigned)(p >> 32));
  (void)top;
#else
  // The frame fb_emu_switch pops: [mxcsr|x87 cw] r15 r14 r13 r12 rbx rbp return-address. After the
  // `ret` the stack pointer is `top`, 16-byte aligned as the call in fb_emu_fiber_start needs.
  uint64_t* frame = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t(15)) - 8;
  uint32_t mxcsr;
  uint16_t fpu_cw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpu_cw));
  frame[0] = (uint64_t)mxcsr | ((uint64_t)fpu_cw << 32);
  frame[1] = frame[2] = 0;                               // r15 r14
  frame[3] = reinterpret_cast<uint64_t>(&fiber_main);    // r13: the function to call
  frame[4] = reinterpret_cast<uint64_t>(f);              // r12: its argument
  frame[5] = frame[6] = 0;                               // rbx rbp
  frame[7] = reinterpret_cast<uint64_t>(&fb_emu_fiber_start);
  f->sp = frame;
#endif
}

Fiber* take_idle_fiber() {
  Scheduler& s = sched();
  if (!s.idle.empty()) {
    Fiber* f = s.idle.back();
    s.idle.pop_back();
    return f;
  }
  auto* f = new Fiber();
  const size_t page = (size_t)getpagesize();
  f->mapping_bytes = kStackBytes + page;
  void* m = mmap(nullptr, f->mapping_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (m == MAP_FAILED) {
    delete f;
    fail("fastbone emulator: cannot allocate a fiber stack");
  }
  f->mapping = static_cast<char*>(m);
  mprotect(f->mapping, page, PROT_NONE);  // a stack overflow faults instead of corrupting memory
  init_fiber_stack(f);
  s.fibers.push_back(f);
  return f;
}

// Scheduler -> fiber.
void resume(Fiber* f) {
  Scheduler& s = sched();
  s.current_fiber = f;
#ifdef FB_EMU_USE_UCONTEXT
  swapcontext(&s.scheduler_context, &f->context);
#else
  fb_emu_switch(&s.scheduler_sp, f->sp);
#endif
}

// Fiber -> scheduler.
void suspend() {
  Scheduler& s = sched();
  Fiber* f = s.current_fiber;
#ifdef FB_EMU_USE_UCONTEXT
  swapcontext(&f->context, &s.scheduler_context);
#else
  fb_emu_switch(&f->sp, s.scheduler_sp);
#endif
}

// Performs thread t's queued copies of groups below `limit`, in issue order.
void perform_async_copies(ThreadState& ts, long long limit) {
  size_t done = 0;
  for (; done < ts.async_copies.size() && ts.async_copies[done].group < limit; ++done) {
    const AsyncCopy& c = ts.async_copies[done];
    unsigned char* dst = static_cast<unsigned char*>(c.dst);
    if (c.src_bytes > 0) std::memcpy(dst, c.src, (size_t)c.src_bytes);
    std::memset(dst + c.src_bytes, 0, (size_t)(c.bytes - c.src_bytes));
  }
  ts.async_copies.erase(ts.async_copies.begin(), ts.async_copies.begin() + (std::ptrdiff_t)done);
}

void thread_exited(int t) {
  Scheduler& s = sched();
  // A GPU completes a returning thread's outstanding copies; so does the emulator (committed or not).
  perform_async_copies(s.threads[t], INT64_MAX);
  s.threads[t].status = kDone;
  --s.live;
  --s.warp_live[t / 32];
}

void fiber_main(Fiber* self) {
  Scheduler& s = sched();
  for (;;) {
    while (s.next_unstarted < s.block_threads && !s.failed) {
      const int t = s.next_unstarted++;
      s.current_thread = t;
      s.threads[t].status = kRunning;
      s.threads[t].fiber = self;
      set_thread_registers(t);
      try {
        s.body(s.payload);
      } catch (const std::exception& e) {
        s.failed = true;
        s.failure = std::string("raised in ") + where(t) + ": " + e.what();
      } catch (...) {
        s.failed = true;
        s.failure = std::string("raised an unknown exception in ") + where(t);
      }
      thread_exited(t);
    }
    s.current_thread = -1;
    s.idle.push_back(self);
    suspend();  // resumed later, by another block or launch, to run more threads
  }
}

void require_in_kernel(const char* what) {
  if (sched().current_thread < 0 || !tls_in_launch)
    fail(std::string(what) + " called outside an emulated kernel");
}

std::string deadlock_report() {
  Scheduler& s = sched();
  int at_block = 0, at_warp = 0, done = 0;
  std::ostringstream warps;
  for (int t = 0; t < s.block_threads; ++t) {
    at_block += s.threads[t].status == kAtBlockBarrier;
    at_warp += s.threads[t].status == kAtWarpBarrier;
    done += s.threads[t].status == kDone;
  }
  for (size_t w = 0; w < s.warp_waiting.size(); ++w)
    if (s.warp_waiting[w] > 0)
      warps << " warp " << w << ": " << s.warp_waiting[w] << " of " << s.warp_live[w] << " live lanes at a shuffle/vote;";
  std::ostringstream os;
  os << "deadlock in " << where(-1) << ": " << at_block << " threads wait at __syncthreads, " << at_warp
     << " at warp shuffles/votes/__syncwarp, " << done << " have returned;" << warps.str()
     << " every live thread of the block must reach the same barrier (divergent barrier?)";
  return os.str();
}

void release_warp(int w) {
  Scheduler& s = sched();
  const int base = w * 32, lanes = std::min(32, s.block_threads - base);
  uint64_t ballot = 0;
  bool all = true;
  for (int l = 0; l < lanes; ++l) {
    const ThreadState& ts = s.threads[base + l];
    if (ts.status != kAtWarpBarrier) continue;
    if (ts.value) ballot |= 1ull << l;
    all = all && ts.value;
  }
  for (int l = 0; l < lanes; ++l) {
    ThreadState& ts = s.threads[base + l];
    if (ts.status != kAtWarpBarrier || ts.op != WarpOp::kGather) continue;
    // Copied now, while every posting lane is suspended at this barrier (its buffer is stable).
    unsigned char* out = static_cast<unsigned char*>(ts.gather_out);
    for (int src = 0; src < 32; ++src) {
      const ThreadState* from = src < lanes ? &s.threads[base + src] : nullptr;
      const bool posted = from != nullptr && from->status == kAtWarpBarrier && from->op == WarpOp::kGather;
      if (posted && from->gather_bytes != ts.gather_bytes)
        fail("warp_all_gather: lanes of one warp posted different sizes");
      if (posted) std::memcpy(out + src * ts.gather_bytes, from->gather_in, ts.gather_bytes);
      else std::memset(out + src * ts.gather_bytes, 0xff, ts.gather_bytes);
    }
    ts.result = 0;
  }
  for (int l = 0; l < lanes; ++l) {
    ThreadState& ts = s.threads[base + l];
    if (ts.status != kAtWarpBarrier || ts.op == WarpOp::kGather) continue;
    const int segment = l & ~(ts.width - 1);
    int src = l;
    switch (ts.op) {
      case WarpOp::kIndex: src = segment + (ts.arg & (ts.width - 1)); break;
      case WarpOp::kUp: src = l - ts.arg >= segment ? l - ts.arg : l; break;
      case WarpOp::kDown: src = l + ts.arg < segment + ts.width ? l + ts.arg : l; break;
      case WarpOp::kXor: src = (l ^ ts.arg) < segment + ts.width ? (l ^ ts.arg) : l; break;
      default: break;
    }
    switch (ts.op) {
      case WarpOp::kSync: ts.result = 0; break;
      case WarpOp::kBallot: ts.result = ballot; break;
      case WarpOp::kAny: ts.result = ballot != 0; break;
      case WarpOp::kAll: ts.result = all; break;
      default:
        if (src == l) ts.result = ts.value;
        else if (src < lanes && s.threads[base + src].status == kAtWarpBarrier) ts.result = s.threads[base + src].value;
        else ts.result = kPoison;  // a lane that does not exist or has returned: undefined on a GPU
    }
  }
  for (int l = 0; l < lanes; ++l)
    if (s.threads[base + l].status == kAtWarpBarrier) s.threads[base + l].status = kReleased;
  s.warp_waiting[w] = 0;
}

// Runs one block to completion; returns false when a thread failed or the block deadlocked.
bool run_block() {
  Scheduler& s = sched();
  const int n = s.block_threads;
  s.next_unstarted = 0;
  s.live = n;
  s.at_block_barrier = 0;
  for (int t = 0; t < n; ++t) {
    s.threads[t].status = kUnstarted;
    s.threads[t].async_copies.clear();
    s.threads[t].open_group = 0;
  }
  for (size_t w = 0; w < s.warp_live.size(); ++w) {
    s.warp_live[w] = std::min(32, n - (int)w * 32);
    s.warp_waiting[w] = 0;
  }
  while (s.next_unstarted < n && !s.failed) resume(take_idle_fiber());
  // Serial warps: the warp whose threads run this round (-1: every released thread).
  auto first_released_warp = [&]() {
    for (int t = 0; t < n; ++t)
      if (s.threads[t].status == kReleased) return t / 32;
    return -1;
  };
  while (s.live > 0 && !s.failed) {
    bool released = false;
    int run_warp = -1;
    if (g_serial_warps && (run_warp = first_released_warp()) >= 0) {
      // Threads released by a block barrier that have not run yet: they go on after every lower warp
      // has reached its next block barrier (so writes before a missing barrier are not yet made).
      for (size_t w = 0; w < s.warp_live.size() && (int)w < run_warp; ++w)
        if (s.warp_waiting[w] > 0 && s.warp_waiting[w] == s.warp_live[w]) {
          release_warp((int)w);
          run_warp = (int)w;
          break;
        }
      released = true;
    } else if (s.at_block_barrier > 0 && s.at_block_barrier == s.live) {
      int count = 0;
      for (int t = 0; t < n; ++t)
        if (s.threads[t].status == kAtBlockBarrier) count += s.threads[t].value != 0;
      for (int t = 0; t < n; ++t) {
        ThreadState& ts = s.threads[t];
        if (ts.status != kAtBlockBarrier) continue;
        ts.result = (uint64_t)count;
        ts.arrived = s.live;
        ts.status = kReleased;
      }
      s.at_block_barrier = 0;
      released = true;
      if (g_serial_warps) run_warp = first_released_warp();  // the lowest warp first
    } else {
      for (size_t w = 0; w < s.warp_live.size(); ++w) {
        if (s.warp_waiting[w] > 0 && s.warp_waiting[w] == s.warp_live[w]) {
          release_warp((int)w);
          released = true;
          if (g_serial_warps) break;  // this warp alone runs on, to its next block barrier if it can
        }
      }
    }
    if (!released) {
      s.failed = true;
      s.failure = deadlock_report();
      break;
    }
    for (int t = 0; t < n && !s.failed; ++t) {
      if (s.threads[t].status != kReleased || (run_warp >= 0 && t / 32 != run_warp)) continue;
      s.threads[t].status = kRunning;
      s.current_thread = t;
      set_thread_registers(t);
      resume(s.threads[t].fiber);
    }
  }
  s.current_thread = -1;
  return !s.failed;
}

// After a failure, fibers still hold half-run threads: rewind every fiber to a fresh start.
void reset_fibers() {
  Scheduler& s = sched();
  s.idle.clear();
  for (Fiber* f : s.fibers) {
    init_fiber_stack(f);
    s.idle.push_back(f);
  }
}

std::string dims(dim3 d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

}  // namespace

int block_barrier(int predicate, int* arrived) {
  require_in_kernel("__syncthreads");
  Scheduler& s = sched();
  ThreadState& ts = s.threads[s.current_thread];
  ts.status = kAtBlockBarrier;
  ts.value = predicate != 0;
  ++s.at_block_barrier;
  suspend();
  if (arrived) *arrived = ts.arrived;
  return (int)ts.result;
}

uint64_t warp_exchange(uint64_t value, WarpOp op, int arg, int width) {
  require_in_kernel("a warp shuffle/vote");
  if (width < 1 || width > 32 || (width & (width - 1)))
    fail("warp shuffle width must be a power of two in [1, 32], got " + std::to_string(width));
  Scheduler& s = sched();
  const int t = s.current_thread;
  ThreadState& ts = s.threads[t];
  ts.status = kAtWarpBarrier;
  ts.value = value;
  ts.op = op;
  ts.arg = arg;
  ts.width = width;
  ++s.warp_waiting[t / 32];
  suspend();
  return ts.result;
}

void warp_all_gather(const void* mine, void* all, size_t bytes) {
  require_in_kernel("a warp gather (ldmatrix / mma emulation)");
  Scheduler& s = sched();
  const int t = s.current_thread;
  ThreadState& ts = s.threads[t];
  ts.status = kAtWarpBarrier;
  ts.op = WarpOp::kGather;
  ts.gather_in = mine;
  ts.gather_out = all;
  ts.gather_bytes = bytes;
  ts.width = 32;
  ++s.warp_waiting[t / 32];
  suspend();
}

void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
  require_in_kernel("cp.async");
  if (bytes <= 0 || src_bytes < 0 || src_bytes > bytes) fail("cp.async: bad sizes");
  ThreadState& ts = sched().threads[sched().current_thread];
  ts.async_copies.push_back(AsyncCopy{dst, src, bytes, src_bytes, ts.open_group});
}

void cp_async_commit() {
  require_in_kernel("cp.async.commit_group");
  ++sched().threads[sched().current_thread].open_group;
}

void cp_async_wait(int n) {
  require_in_kernel("cp.async.wait_group");
  if (n < 0) fail("cp.async.wait_group: negative group count");
  ThreadState& ts = sched().threads[sched().current_thread];
  perform_async_copies(ts, ts.open_group - n - g_cp_async_wait_slack);  // all but the n most recent groups
}

int set_cp_async_wait_slack(int slack) {
  std::lock_guard<std::mutex> lock(sched().mutex);  // not while a launch runs
  if (slack < 0) fail("set_cp_async_wait_slack: the slack must be >= 0");
  const int previous = g_cp_async_wait_slack;
  g_cp_async_wait_slack = slack;
  return previous;
}

bool set_serial_warps(bool on) {
  std::lock_guard<std::mutex> lock(sched().mutex);  // not while a launch runs
  const bool previous = g_serial_warps;
  g_serial_warps = on;
  return previous;
}

unsigned active_lanes() {
  require_in_kernel("__activemask");
  Scheduler& s = sched();
  const int base = s.current_thread / 32 * 32, lanes = std::min(32, s.block_threads - base);
  unsigned mask = 0;
  for (int l = 0; l < lanes; ++l)
    if (s.threads[base + l].status != kDone) mask |= 1u << l;
  return mask;
}

void* dynamic_smem() {
  require_in_kernel("dynamic shared memory");
  return sched().dynamic_smem;
}

void run_grid(const char* kernel_name, dim3 grid, dim3 block, size_t dynamic_smem_bytes, KernelBody body,
              void* payload) {
  if (tls_in_launch) fail(std::string("fastbone emulator: kernel ") + kernel_name + " launched from inside a kernel");
  const unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x == 0 || block.y == 0 || block.z == 0 ||
      threads > (unsigned long long)kMaxThreadsPerBlock || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    fail(std::string("invalid configuration argument: kernel ") + kernel_name + " launched with grid " + dims(grid) +
         " and block " + dims(block) +
         " (each dimension >= 1, at most 1024 threads per block, block.z <= 64, grid.y and grid.z <= 65535)");
  if (dynamic_smem_bytes > kMaxDynamicSmemBytes)
    fail(std::string("kernel ") + kernel_name + " asks for " + std::to_string(dynamic_smem_bytes) +
         " bytes of dynamic shared memory; at most " + std::to_string(kMaxDynamicSmemBytes));

  Scheduler& s = sched();
  std::lock_guard<std::mutex> lock(s.mutex);
  // Uninitialised shared memory is garbage on a GPU: all-ones bytes (NaN) make reads of it show.
  std::vector<unsigned char> smem(dynamic_smem_bytes + 16, 0xff);
  s.kernel_name = kernel_name;
  s.body = body;
  s.payload = payload;
  s.dynamic_smem = smem.data() + ((16 - reinterpret_cast<uintptr_t>(smem.data()) % 16) % 16);
  s.block_threads = (int)threads;
  s.threads.assign(threads, ThreadState{});
  s.warp_live.assign((threads + 31) / 32, 0);
  s.warp_waiting.assign((threads + 31) / 32, 0);
  s.failed = false;
  s.failure.clear();
  blockDim = block;
  gridDim = grid;
  tls_in_launch = true;
  bool ok = true;
  try {
    for (unsigned z = 0; z < grid.z && ok; ++z)
      for (unsigned y = 0; y < grid.y && ok; ++y)
        for (unsigned x = 0; x < grid.x && ok; ++x) {
          blockIdx = uint3{x, y, z};
          ok = run_block();
        }
  } catch (...) {  // the scheduler itself failed (no memory for a fiber stack)
    tls_in_launch = false;
    s.dynamic_smem = nullptr;
    s.current_thread = -1;
    reset_fibers();
    throw;
  }
  tls_in_launch = false;
  s.dynamic_smem = nullptr;
  if (!ok) {
    reset_fibers();
    throw std::runtime_error(std::string("fastbone emulator: kernel ") + kernel_name + " " + s.failure);
  }
}

}  // namespace fb_emu
