/*
 * Run: make -C bindings/c test
 *   (or: bindings/c/build/asan/lifetimes ACCEPTING_RELAY CLOSED_PORT_RELAY)
 *
 * Lifetimes across threads, as the header promises them, built with AddressSanitizer:
 *
 * 1. mxp_dispatcher_free returns only after the callback has returned for the last time, even
 *    when the callback is inside a blocking call on the same dispatcher at that moment: the
 *    caller frees `userdata` as soon as free returns, and ASan reports any later use.
 * 2. A thread blocked in mxp_dispatcher_wait_events without a time limit is woken by a
 *    shutdown (and by a free) and gets MXP_ERR_SHUT_DOWN once every event has been read; a
 *    fresh call after the shutdown returns MXP_ERR_SHUT_DOWN at once.
 *
 * The second argument is a relay where nothing listens: its recipients are deferred and wait
 * for a retry, so a wait for every final outcome blocks. A watchdog (alarm) ends a run that
 * hangs, which counts as a failure.
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "mxpipe.h"
#include "util.h"

static int failures = 0;

static void expect(const char *name, int ok, const char *detail) {
    printf("%-4s %s%s%s\n", ok ? "ok" : "FAIL", name, detail ? ": " : "", detail ? detail : "");
    if (!ok) {
        failures++;
    }
}

static void sleep_ms(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

static const uint8_t BODY[] = "Subject: lifetimes\r\n\r\nbody\r\n";
#define BODY_LEN (sizeof BODY - 1)

/* A dispatcher relaying to `relay`, with "deferred.example" routed to `closed`. */
static mxp_dispatcher *start(const char *relay, const char *closed) {
    char route[300];
    snprintf(route, sizeof route, "deferred.example=%s", closed);
    mxp_config *config;
    check(mxp_config_new(&config), "mxp_config_new");
    check(mxp_config_set(config, "relay", relay), "relay");
    check(mxp_config_set(config, "route", route), "route");
    check(mxp_config_set(config, "connect_timeout", "2s"), "connect_timeout");
    mxp_dispatcher *d;
    check(mxp_dispatcher_new(config, &d), "mxp_dispatcher_new");
    check(mxp_config_free(config), "mxp_config_free");
    return d;
}

static void enqueue_one(mxp_dispatcher *d, const char *recipient) {
    const char *to[] = {recipient};
    uint64_t id;
    check(mxp_dispatcher_enqueue(d, "sender@example.org", to, 1, BODY, BODY_LEN, 0, &id),
          recipient);
}

/* ----- 1. free waits for a callback that is inside a blocking call ---------------------- */

/* Set by the main thread once mxp_dispatcher_free has returned; outside userdata, so that the
 * callback can check it without touching freed memory. */
static atomic_int free_returned;
static atomic_int callback_after_free;
static atomic_int callback_inside;

struct userdata {
    mxp_dispatcher *dispatcher;
    int events;
    mxp_result wait_result;
};

static void blocking_callback(void *opaque, const mxp_event *event) {
    if (atomic_load(&free_returned)) {
        atomic_fetch_add(&callback_after_free, 1);
    }
    struct userdata *user = opaque;
    user->events++;
    if (strcmp(event->recipient, "first@example.net") == 0) {
        /* A follow-up, then a wait for every final outcome: the deferred recipient keeps it
         * waiting until the dispatcher is freed on the main thread. */
        enqueue_one(user->dispatcher, "follow-up@example.net");
        atomic_store(&callback_inside, 1);
        user->wait_result = mxp_dispatcher_wait_final(user->dispatcher, 3000);
        mxp_dispatcher_flush(user->dispatcher);
    }
    if (atomic_load(&free_returned)) {
        atomic_fetch_add(&callback_after_free, 1);
    }
}

static void free_waits_for_the_callback(const char *relay, const char *closed) {
    struct userdata *user = calloc(1, sizeof *user);
    mxp_dispatcher *d = start(relay, closed);
    user->dispatcher = d;
    check(mxp_dispatcher_set_callback(d, blocking_callback, user), "set_callback");
    enqueue_one(d, "someone@deferred.example");
    enqueue_one(d, "first@example.net");
    for (int i = 0; i < 1000 && !atomic_load(&callback_inside); i++) {
        sleep_ms(10);
    }
    expect("the callback is inside mxp_dispatcher_wait_final", atomic_load(&callback_inside),
           NULL);
    sleep_ms(100);
    mxp_result rc = mxp_dispatcher_free(d);
    atomic_store(&free_returned, 1);
    expect("mxp_dispatcher_free while the callback waits: MXP_OK", rc == MXP_OK,
           mxp_result_str(rc));
    expect("  ...the callback's wait ended with MXP_ERR_SHUT_DOWN",
           user->wait_result == MXP_ERR_SHUT_DOWN, mxp_result_str(user->wait_result));
    /* deferred (someone), delivered (first), delivered (follow-up) */
    char seen[64];
    snprintf(seen, sizeof seen, "%d events", user->events);
    expect("  ...the callback saw every event before free returned", user->events == 3, seen);
    free(user); /* as a caller may: ASan reports any use after this */
    sleep_ms(500);
    expect("  ...no callback ran after free returned", atomic_load(&callback_after_free) == 0,
           NULL);
}

/* ----- 2. waiters are woken by shutdown and free ---------------------------------------- */

struct waiter {
    mxp_dispatcher *dispatcher;
    size_t events;
    mxp_result result;
    atomic_int done;
};

static void *wait_without_limit(void *opaque) {
    struct waiter *w = opaque;
    mxp_event events[4];
    for (;;) {
        size_t n = 0;
        w->result = mxp_dispatcher_wait_events(w->dispatcher, events, 4, UINT64_MAX, &n);
        if (w->result != MXP_OK) {
            break;
        }
        w->events += n;
    }
    atomic_store(&w->done, 1);
    return NULL;
}

static void wait_for_done(struct waiter *w) {
    for (int i = 0; i < 1000 && !atomic_load(&w->done); i++) {
        sleep_ms(10);
    }
}

static void waiters_are_woken(const char *relay, const char *closed, int by_free) {
    const char *how = by_free ? "free" : "shutdown";
    char name[160];
    mxp_dispatcher *d = start(relay, closed);
    struct waiter w = {.dispatcher = d};
    pthread_t thread;
    pthread_create(&thread, NULL, wait_without_limit, &w);
    enqueue_one(d, "a@example.net");
    enqueue_one(d, "b@deferred.example");
    check(mxp_dispatcher_flush(d), "flush");
    sleep_ms(200);
    mxp_result rc = by_free ? mxp_dispatcher_free(d) : mxp_dispatcher_shutdown(d);
    snprintf(name, sizeof name, "mxp_dispatcher_%s with a thread in wait_events(UINT64_MAX)",
             how);
    expect(name, rc == MXP_OK, mxp_result_str(rc));
    wait_for_done(&w);
    snprintf(name, sizeof name, "  ...the waiter was woken by the %s", how);
    expect(name, atomic_load(&w.done), NULL);
    if (!atomic_load(&w.done)) {
        return; /* the thread is still blocked: leave it */
    }
    pthread_join(thread, NULL);
    expect("  ...with MXP_ERR_SHUT_DOWN", w.result == MXP_ERR_SHUT_DOWN, mxp_result_str(w.result));
    char count[64];
    snprintf(count, sizeof count, "%zu events", w.events);
    expect("  ...after reading both events", w.events == 2, count);
    if (by_free) {
        return;
    }
    mxp_event event;
    size_t n = 99;
    rc = mxp_dispatcher_wait_events(d, &event, 1, 60000, &n);
    expect("a fresh wait_events(60 s) after shutdown: MXP_ERR_SHUT_DOWN at once",
           rc == MXP_ERR_SHUT_DOWN && n == 99, mxp_result_str(rc));
    check(mxp_dispatcher_free(d), "free");
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s ACCEPTING_RELAY CLOSED_PORT_RELAY\n", argv[0]);
        return 2;
    }
    alarm(60); /* a hang is a failure */
    free_waits_for_the_callback(argv[1], argv[2]);
    waiters_are_woken(argv[1], argv[2], 0);
    waiters_are_woken(argv[1], argv[2], 1);
    printf("lifetimes: %d failed\n", failures);
    return failures == 0 ? 0 : 1;
}
