/*
 * Run: make -C bindings/c test
 *   (or: bindings/c/build/asan/shutdown_deadline ACCEPTING_RELAY SLOW_RELAY)
 *
 * The bounded shutdown, mxp_dispatcher_shutdown_timeout: against a relay that takes two
 * seconds to answer DATA (smtp-sink -w 2), a deadline of 200 ms leaves every recipient with
 * one Deferred event saying why (code 0, 4.3.2, no retry time), whether its transaction was
 * under way or it was still queued; a second thread's shutdown_timeout(0) cuts a plain
 * mxp_dispatcher_shutdown short; and with time enough, everything is delivered and MXP_OK
 * returned.
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
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

static const uint8_t BODY[] = "Subject: deadline\r\n\r\nbody\r\n";
#define BODY_LEN (sizeof BODY - 1)

/* One connection, so that the second message waits in the queue behind the first. */
static mxp_dispatcher *start(const char *relay) {
    mxp_config *config;
    check(mxp_config_new(&config), "mxp_config_new");
    check(mxp_config_set(config, "relay", relay), "relay");
    check(mxp_config_set(config, "max_connections_per_destination", "1"), "max_connections");
    mxp_dispatcher *d;
    check(mxp_dispatcher_new(config, &d), "mxp_dispatcher_new");
    check(mxp_config_free(config), "mxp_config_free");
    return d;
}

static void enqueue_two(mxp_dispatcher *d) {
    const char *first[] = {"a@example.net", "b@example.net"};
    const char *second[] = {"c@example.net"};
    uint64_t id;
    check(mxp_dispatcher_enqueue(d, "s@example.org", first, 2, BODY, BODY_LEN, 0, &id), "first");
    check(mxp_dispatcher_enqueue(d, "s@example.org", second, 1, BODY, BODY_LEN, 0, &id), "second");
}

/* Reads every event; checks that each recipient got exactly one, Deferred by the shutdown. */
static void expect_all_abandoned(mxp_dispatcher *d, const char *label) {
    mxp_event events[8];
    size_t n = 0;
    char name[200], detail[700];
    check(mxp_dispatcher_poll_events(d, events, 8, &n), "poll_events");
    snprintf(name, sizeof name, "%s: one event per recipient", label);
    snprintf(detail, sizeof detail, "%zu events", n);
    expect(name, n == 3, detail);
    int cut_short = 0, not_tried = 0;
    for (size_t i = 0; i < n; i++) {
        const mxp_event *e = &events[i];
        int ok = e->kind == MXP_EVENT_KIND_DEFERRED && e->code == 0 && e->enhanced_class == 4 &&
                 e->enhanced_subject == 3 && e->enhanced_detail == 2 && e->retry_after_ms == -1;
        if (strstr(e->text, "mxpipe shut down during the transaction") == e->text) {
            cut_short++;
        } else if (strcmp(e->text, "mxpipe shut down before this recipient was tried") == 0) {
            not_tried++;
        } else {
            ok = 0;
        }
        snprintf(name, sizeof name, "  ...%s deferred, 4.3.2, no retry time", e->recipient);
        snprintf(detail, sizeof detail, "%s %u %u.%u.%u retry %lld \"%s\"", mxp_event_kind_str(e->kind),
                 e->code, e->enhanced_class, e->enhanced_subject, e->enhanced_detail,
                 (long long)e->retry_after_ms, e->text);
        expect(name, ok, detail);
    }
    snprintf(detail, sizeof detail, "%d cut short, %d not tried", cut_short, not_tried);
    expect("  ...two cut short in their transaction, one never tried",
           cut_short == 2 && not_tried == 1, detail);
    mxp_stats stats;
    check(mxp_dispatcher_stats(d, &stats), "stats");
    snprintf(detail, sizeof detail, "delivered %llu deferred %llu in_flight %llu",
             (unsigned long long)stats.delivered, (unsigned long long)stats.deferred,
             (unsigned long long)stats.in_flight);
    expect("  ...counted as deferred, none delivered",
           stats.delivered == 0 && stats.deferred == 3 && stats.in_flight == 3, detail);
}

static void deadline_passes(const char *slow) {
    mxp_dispatcher *d = start(slow);
    enqueue_two(d);
    sleep_ms(300); /* the first transaction is waiting for the reply to its DATA */
    mxp_result rc = mxp_dispatcher_shutdown_timeout(d, 200);
    expect("shutdown_timeout(200 ms) with a slow server: MXP_ERR_TIMED_OUT",
           rc == MXP_ERR_TIMED_OUT, rc == MXP_OK ? "MXP_OK" : last_error());
    uint64_t id;
    const char *to[] = {"late@example.net"};
    rc = mxp_dispatcher_enqueue(d, "s@example.org", to, 1, BODY, BODY_LEN, 0, &id);
    expect("  ...enqueue afterwards: MXP_ERR_SHUT_DOWN", rc == MXP_ERR_SHUT_DOWN,
           mxp_result_str(rc));
    expect_all_abandoned(d, "deadline of 200 ms");
    check(mxp_dispatcher_free(d), "free");
}

static void *plain_shutdown(void *d) {
    check(mxp_dispatcher_shutdown(d), "shutdown");
    return NULL;
}

static void second_call_cuts_short(const char *slow) {
    mxp_dispatcher *d = start(slow);
    enqueue_two(d);
    pthread_t thread;
    pthread_create(&thread, NULL, plain_shutdown, d);
    sleep_ms(300);
    mxp_result rc = mxp_dispatcher_shutdown_timeout(d, 0);
    expect("shutdown_timeout(0) during another thread's mxp_dispatcher_shutdown",
           rc == MXP_ERR_TIMED_OUT, mxp_result_str(rc));
    pthread_join(thread, NULL);
    expect_all_abandoned(d, "cut short");
    check(mxp_dispatcher_free(d), "free");
}

static void time_enough(const char *relay) {
    mxp_dispatcher *d = start(relay);
    enqueue_two(d);
    mxp_result rc = mxp_dispatcher_shutdown_timeout(d, 30000);
    expect("shutdown_timeout(30 s) with a fast server: MXP_OK", rc == MXP_OK,
           mxp_result_str(rc));
    mxp_event events[8];
    size_t n = 0;
    check(mxp_dispatcher_poll_events(d, events, 8, &n), "poll_events");
    int delivered = 0;
    for (size_t i = 0; i < n; i++) {
        delivered += events[i].kind == MXP_EVENT_KIND_DELIVERED;
    }
    char detail[64];
    snprintf(detail, sizeof detail, "%d of %zu events delivered", delivered, n);
    expect("  ...every recipient delivered", n == 3 && delivered == 3, detail);
    check(mxp_dispatcher_free(d), "free");
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s ACCEPTING_RELAY SLOW_RELAY\n", argv[0]);
        return 2;
    }
    alarm(60); /* a hang is a failure */
    deadline_passes(argv[2]);
    second_call_cuts_short(argv[2]);
    time_enough(argv[1]);
    printf("shutdown_deadline: %d failed\n", failures);
    return failures == 0 ? 0 : 1;
}
