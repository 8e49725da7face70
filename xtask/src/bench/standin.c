/* A QEMU stand-in for the scale and teardown benchmarks: the per-VM probes a QEMU built with
 * USDT probes gets, in a process of a few hundred kilobytes, so that hundreds of them fit where
 * real guests would not. Built by `cargo xtask bench` (xtask/src/bench/standin.rs) as a file
 * named `qemu-system-x86_64`, run with `-name guest=NAME`.
 *
 * - USDT probes named as QEMU's dtrace backend names them (provider `qemu`,
 *   `memory_region_ops_read` / `_write`, with semaphores): the profiler's read/write source.
 * - Functions named as QEMU's timer functions (`timer_mod_ns`, `timer_mod_anticipate_ns`),
 *   taking a `QEMUTimer` whose callback is at offset 16 as in QEMU: the profiler's symbols
 *   source finds the callbacks this process arms and counts their runs.
 *
 * Its loop, every `--period-ms` (10): arm a timer (two callbacks, alternately), run its
 * callback, and read or write a "device" through the USDT probes while they are enabled. */
#define _SDT_HAS_SEMAPHORES 1
#include <sys/sdt.h>

#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

__extension__ unsigned short qemu_memory_region_ops_read_semaphore
    __attribute__((unused)) __attribute__((section(".probes")));
__extension__ unsigned short qemu_memory_region_ops_write_semaphore
    __attribute__((unused)) __attribute__((section(".probes")));

/* What QEMU's dtrace-generated trace header defines: a probe's code runs only while a
 * tracer holds its semaphore. */
#define QEMU_MEMORY_REGION_OPS_READ_ENABLED() \
    __builtin_expect(qemu_memory_region_ops_read_semaphore, 0)
#define QEMU_MEMORY_REGION_OPS_WRITE_ENABLED() \
    __builtin_expect(qemu_memory_region_ops_write_semaphore, 0)

/* QEMU's QEMUTimer, as far as the profiler reads it: `cb` at offset 16. */
typedef struct QEMUTimer {
    int64_t expire_time;
    void *timer_list;
    void (*cb)(void *opaque);
    void *opaque;
} QEMUTimer;

/* A MemoryRegion's name is what the USDT probe's `mr` points at, as far as a stand-in goes. */
static char region[64] = "standin-device";
static volatile uint64_t value;

__attribute__((noinline)) void timer_mod_ns(QEMUTimer *ts, int64_t expire_time) {
    ts->expire_time = expire_time;
    __asm__ volatile("" ::: "memory");
}

__attribute__((noinline)) void timer_mod_anticipate_ns(QEMUTimer *ts, int64_t expire_time) {
    if (expire_time < ts->expire_time || ts->expire_time == 0) {
        timer_mod_ns(ts, expire_time);
    }
}

__attribute__((noinline)) void standin_frame_timer(void *opaque) {
    value += (uintptr_t)opaque;
    if (QEMU_MEMORY_REGION_OPS_READ_ENABLED()) {
        STAP_PROBE6(qemu, memory_region_ops_read, 0, region, (uint64_t)0x10, value, 4, region);
    }
}

__attribute__((noinline)) void standin_rtc_timer(void *opaque) {
    value ^= (uintptr_t)opaque;
    if (QEMU_MEMORY_REGION_OPS_WRITE_ENABLED()) {
        STAP_PROBE6(qemu, memory_region_ops_write, 0, region, (uint64_t)0x70, value, 1, region);
    }
}

int main(int argc, char **argv) {
    long period_ms = 10;
    for (int i = 1; i + 1 < argc; i++) {
        if (strcmp(argv[i], "--period-ms") == 0) {
            period_ms = atol(argv[i + 1]);
        }
    }
    struct timespec ts = {period_ms / 1000, (period_ms % 1000) * 1000000};
    QEMUTimer timers[2] = {
        {0, 0, standin_frame_timer, (void *)1},
        {0, 0, standin_rtc_timer, (void *)2},
    };
    for (uint64_t n = 0;; n++) {
        QEMUTimer *t = &timers[n & 1];
        timer_mod_anticipate_ns(t, (int64_t)n * period_ms * 1000000);
        ppoll(NULL, 0, &ts, NULL);
        t->cb(t->opaque);
    }
}
