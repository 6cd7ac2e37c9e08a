/*
 * Run: make -C bindings/c test
 *   (or: bindings/c/build/shared/bulk_threads ACCEPTING_RELAY REJECTING_RELAY [MESSAGES_PER_THREAD])
 *
 * A bulk sender: 4 producer threads enqueue at once into one dispatcher, then the main thread
 * reads every outcome and checks the counts. Each message goes to two recipients: one at
 * accept.example (routed to a relay that accepts) and one at reject.example (routed to a relay
 * that refuses RCPT), so each message gives one delivery and one bounce.
 * Threads 0 and 1 use the bulk path (one prepared body shared by every message), threads 2 and
 * 3 pass the body bytes with each message.
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mxpipe.h"
#include "util.h"

#define THREADS 4

static mxp_dispatcher *dispatcher;
static mxp_body *shared_body;
static long per_thread = 2500;

static const char body_text[] =
    "From: news@example.org\r\n"
    "Subject: bulk\r\n"
    "\r\n"
    "Same body for everyone.\r\n";

static void *producer(void *arg) {
    long thread = (long)(intptr_t)arg;
    char accept[64], reject[64];
    const char *recipients[] = {accept, reject};
    for (long i = 0; i < per_thread; i++) {
        snprintf(accept, sizeof accept, "user%ld.%ld@accept.example", thread, i);
        snprintf(reject, sizeof reject, "user%ld.%ld@reject.example", thread, i);
        uint64_t id;
        mxp_result rc;
        if (thread < 2) {
            rc = mxp_dispatcher_enqueue_body_timeout(dispatcher, "news@example.org", recipients,
                                                     2, shared_body, 0, 60000, &id);
        } else {
            rc = mxp_dispatcher_enqueue_timeout(dispatcher, "news@example.org", recipients, 2,
                                                (const uint8_t *)body_text, strlen(body_text), 0,
                                                60000, &id);
        }
        check(rc, "enqueue");
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s ACCEPTING_RELAY REJECTING_RELAY [MESSAGES_PER_THREAD]\n",
                argv[0]);
        return 1;
    }
    if (argc > 3) {
        per_thread = strtol(argv[3], NULL, 10);
    }
    char route[128];
    snprintf(route, sizeof route, "reject.example=%s", argv[2]);

    mxp_config *config;
    check(mxp_config_new(&config), "mxp_config_new");
    check(mxp_config_set(config, "relay", argv[1]), "relay");
    check(mxp_config_set(config, "route", route), "route");
    check(mxp_config_set(config, "ehlo_name", "bulk.example"), "ehlo_name");
    check(mxp_config_set(config, "max_connections_per_destination", "4"), "connections");
    check(mxp_dispatcher_new(config, &dispatcher), "mxp_dispatcher_new");
    check(mxp_config_free(config), "mxp_config_free");
    check(mxp_body_new((const uint8_t *)body_text, strlen(body_text), &shared_body),
          "mxp_body_new");

    pthread_t threads[THREADS];
    for (long t = 0; t < THREADS; t++) {
        pthread_create(&threads[t], NULL, producer, (void *)(intptr_t)t);
    }
    for (int t = 0; t < THREADS; t++) {
        pthread_join(threads[t], NULL);
    }
    /* Queued messages hold their own reference to the body. */
    check(mxp_body_free(shared_body), "mxp_body_free");

    const uint64_t messages = (uint64_t)per_thread * THREADS;
    const uint64_t expected_finals = 2 * messages;
    uint64_t delivered = 0, bounced = 0, other = 0, wrong = 0, finals = 0;
    static mxp_event events[1024];
    while (finals < expected_finals) {
        size_t n = 0;
        check(mxp_dispatcher_wait_events(dispatcher, events, 1024, 30000, &n), "wait_events");
        if (n == 0) {
            fprintf(stderr, "no outcome within 30 s (%" PRIu64 " of %" PRIu64 " final)\n",
                    finals, expected_finals);
            return 1;
        }
        for (size_t i = 0; i < n; i++) {
            const mxp_event *e = &events[i];
            int to_accept = strstr(e->recipient, "@accept.example") != NULL;
            uint64_t wrong_before = wrong;
            switch (e->kind) {
            case MXP_EVENT_KIND_DELIVERED:
                delivered++;
                wrong += !to_accept || e->code != 250;
                break;
            case MXP_EVENT_KIND_BOUNCED:
                bounced++;
                wrong += to_accept || e->code < 500 || e->code > 599;
                break;
            case MXP_EVENT_KIND_DEFERRED:
                other++;
                fprintf(stderr, "deferred: %s %u %s\n", e->recipient, e->code, e->text);
                continue;
            case MXP_EVENT_KIND_EXPIRED:
                other++;
                break;
            }
            finals++;
            if (wrong > wrong_before && wrong <= 5) {
                fprintf(stderr, "unexpected: %s %s %u %s\n", e->recipient, mxp_event_kind_str(e->kind),
                        e->code, e->text);
            }
        }
    }
    mxp_stats stats;
    check(mxp_dispatcher_stats(dispatcher, &stats), "mxp_dispatcher_stats");
    check(mxp_dispatcher_free(dispatcher), "mxp_dispatcher_free");

    printf("messages=%" PRIu64 " delivered=%" PRIu64 " bounced=%" PRIu64 " other=%" PRIu64
           " wrong=%" PRIu64 " connections_opened=%" PRIu64 " transactions=%" PRIu64 "\n",
           messages, delivered, bounced, other, wrong, stats.connections_opened,
           stats.transactions);
    int ok = delivered == messages && bounced == messages && other == 0 && wrong == 0 &&
             stats.submitted_messages == messages &&
             stats.submitted_recipients == expected_finals && stats.delivered == messages &&
             stats.bounced == messages && stats.in_flight == 0 &&
             stats.final_events_read == expected_finals;
    printf("%s\n", ok ? "bulk_threads: all outcomes as expected" : "bulk_threads: MISMATCH");
    return ok ? 0 : 1;
}
