/*
 * Run: make -C bindings/c bench   (starts smtp-sink and runs every configuration below)
 *
 *   bench_enqueue RELAY enqueue THREADS body|bytes MESSAGES idle|delivering
 *       Enqueue rate: THREADS producer threads enqueue MESSAGES one-recipient messages in all
 *       (body: one prepared body shared through mxp_dispatcher_enqueue_body; bytes: the body
 *       bytes passed with each message through mxp_dispatcher_enqueue). Events are off and the
 *       queue holds every message, so only enqueueing is timed: from a common start until the
 *       last thread is done. "idle": the event loop takes one message at a time
 *       (max_queued_recipients = 1), so the producers have the CPU to themselves;
 *       "delivering": the loop takes and delivers messages to RELAY meanwhile, on the same
 *       cores. The process then exits without waiting for delivery.
 *   bench_enqueue RELAY e2e MESSAGES SIZE CONNECTIONS
 *       End to end, as `mxpipe bench --to RELAY`: one thread enqueues MESSAGES messages of about
 *       SIZE bytes (waiting for room), and the clock stops when every one is delivered.
 *
 * Prints one line "result ..." with msgs_per_s (wall clock) and, for enqueue, the producers'
 * own CPU time per message (cpu_ns_per_msg, msgs_per_cpu_s): the rate one core would give,
 * which other load on the machine does not change.
 */
#define _POSIX_C_SOURCE 200809L
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "mxpipe.h"
#include "util.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static mxp_dispatcher *dispatcher;
static mxp_body *body;
static const char *api;
static long per_thread;
static pthread_barrier_t barrier;
static const char BODY[] = "From: bench@mxpipe.example\r\nSubject: bench\r\n\r\nHello.\r\n";

static double thread_cpu_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* CPU seconds the producers spent enqueueing, summed over threads. */
static double producer_cpu_s;
static pthread_mutex_t cpu_lock = PTHREAD_MUTEX_INITIALIZER;

static void *producer(void *arg) {
    long thread = (long)(intptr_t)arg;
    char recipient[64];
    snprintf(recipient, sizeof recipient, "user%ld@sink.example", thread);
    const char *recipients[] = {recipient};
    const int shared = strcmp(api, "body") == 0;
    const size_t body_len = strlen(BODY);
    pthread_barrier_wait(&barrier);
    double cpu_start = thread_cpu_s();
    for (long i = 0; i < per_thread; i++) {
        uint64_t id;
        mxp_result rc = shared
            ? mxp_dispatcher_enqueue_body(dispatcher, "bench@mxpipe.example", recipients, 1,
                                          body, 0, &id)
            : mxp_dispatcher_enqueue(dispatcher, "bench@mxpipe.example", recipients, 1,
                                     (const uint8_t *)BODY, body_len, 0, &id);
        check(rc, "enqueue");
    }
    double cpu = thread_cpu_s() - cpu_start;
    pthread_mutex_lock(&cpu_lock);
    producer_cpu_s += cpu;
    pthread_mutex_unlock(&cpu_lock);
    return NULL;
}

static mxp_dispatcher *start(const char *relay, const char *queue, const char *connections,
                             const char *held) {
    mxp_config *config;
    check(mxp_config_new(&config), "mxp_config_new");
    check(mxp_config_set(config, "relay", relay), "relay");
    check(mxp_config_set(config, "ehlo_name", "bench.mxpipe.example"), "ehlo_name");
    check(mxp_config_set(config, "record_events", "false"), "record_events");
    check(mxp_config_set(config, "queue_capacity", queue), "queue_capacity");
    check(mxp_config_set(config, "max_connections_per_destination", connections), "connections");
    check(mxp_config_set(config, "max_messages_per_connection", "4294967295"), "per_connection");
    if (held) {
        check(mxp_config_set(config, "max_queued_recipients", held), "max_queued_recipients");
    }
    mxp_dispatcher *d;
    check(mxp_dispatcher_new(config, &d), "mxp_dispatcher_new");
    check(mxp_config_free(config), "mxp_config_free");
    return d;
}

static int bench_enqueue(const char *relay, long threads, long messages, int loop_busy) {
    per_thread = messages / threads;
    char queue[32];
    snprintf(queue, sizeof queue, "%ld", per_thread * threads + 1);
    /* With the loop holding at most one recipient, it takes one message at a time from the
       queue and the enqueueing threads have the CPU to themselves. */
    dispatcher = start(relay, queue, "20", loop_busy ? NULL : "1");
    check(mxp_body_new((const uint8_t *)BODY, strlen(BODY), &body), "mxp_body_new");
    pthread_barrier_init(&barrier, NULL, (unsigned)threads + 1);
    pthread_t ids[64];
    for (long t = 0; t < threads; t++) {
        pthread_create(&ids[t], NULL, producer, (void *)(intptr_t)t);
    }
    pthread_barrier_wait(&barrier);
    double start = now_s();
    for (long t = 0; t < threads; t++) {
        pthread_join(ids[t], NULL);
    }
    double elapsed = now_s() - start;
    mxp_stats stats;
    check(mxp_dispatcher_stats(dispatcher, &stats), "mxp_dispatcher_stats");
    const double n = (double)stats.submitted_messages;
    printf("result mode=enqueue loop=%s api=%s threads=%ld messages=%" PRIu64 " seconds=%.3f "
           "msgs_per_s=%.0f cpu_ns_per_msg=%.1f msgs_per_cpu_s=%.0f\n",
           loop_busy ? "delivering" : "idle", api, threads, stats.submitted_messages, elapsed,
           n / elapsed, producer_cpu_s * 1e9 / n, n / producer_cpu_s);
    fflush(stdout);
    /* Delivering the queued messages to the sink would take far longer than enqueueing them
       and is not what is measured: end the process here. */
    _exit(0);
}

static int bench_e2e(const char *relay, long messages, long size, const char *connections) {
    /* The same message as `mxpipe bench`: headers, then a line repeated up to SIZE bytes. */
    static const char headers[] = "From: bench@mxpipe.example\r\nTo: sink@mxpipe.example\r\n"
                                  "Subject: mxpipe bench\r\nMessage-ID: <bench@mxpipe.example>\r\n"
                                  "\r\n";
    static const char line[] =
        "The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.\r\n";
    size_t cap = strlen(headers) + (size_t)size + sizeof line;
    char *content = malloc(cap);
    strcpy(content, headers);
    size_t len = strlen(headers);
    while (len < (size_t)size) {
        memcpy(content + len, line, strlen(line));
        len += strlen(line);
    }
    dispatcher = start(relay, "65536", connections, NULL);
    check(mxp_body_new((const uint8_t *)content, len, &body), "mxp_body_new");
    free(content);
    const char *recipients[] = {"user0@sink.example"};
    double start = now_s();
    for (long i = 0; i < messages; i++) {
        uint64_t id;
        check(mxp_dispatcher_enqueue_body_timeout(dispatcher, "bench@mxpipe.example",
                                                  recipients, 1, body, 0, 60000, &id),
              "enqueue");
    }
    check(mxp_dispatcher_wait_final(dispatcher, 600000), "mxp_dispatcher_wait_final");
    double elapsed = now_s() - start;
    mxp_stats stats;
    check(mxp_dispatcher_stats(dispatcher, &stats), "mxp_dispatcher_stats");
    check(mxp_body_free(body), "mxp_body_free");
    check(mxp_dispatcher_free(dispatcher), "mxp_dispatcher_free");
    printf("result mode=e2e messages=%ld delivered=%" PRIu64 " seconds=%.3f msgs_per_s=%.0f "
           "connections=%" PRIu64 "\n",
           messages, stats.delivered, elapsed, (double)messages / elapsed,
           stats.connections_opened);
    return stats.delivered == (uint64_t)messages ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc >= 7 && strcmp(argv[2], "enqueue") == 0) {
        api = argv[4];
        long threads = strtol(argv[3], NULL, 10);
        int loop_busy = strcmp(argv[6], "delivering") == 0;
        if (threads < 1 || threads > 64 || (strcmp(api, "body") && strcmp(api, "bytes")) ||
            (!loop_busy && strcmp(argv[6], "idle"))) {
            fprintf(stderr, "THREADS is 1 to 64, the API body or bytes, the loop idle or "
                            "delivering\n");
            return 1;
        }
        return bench_enqueue(argv[1], threads, strtol(argv[5], NULL, 10), loop_busy);
    }
    if (argc >= 6 && strcmp(argv[2], "e2e") == 0) {
        return bench_e2e(argv[1], strtol(argv[3], NULL, 10), strtol(argv[4], NULL, 10),
                         argv[5]);
    }
    fprintf(stderr,
            "usage: %s RELAY enqueue THREADS body|bytes MESSAGES idle|delivering\n"
            "       %s RELAY e2e MESSAGES SIZE CONNECTIONS\n",
            argv[0], argv[0]);
    return 1;
}
