/*
 * Run: make -C bindings/c test   (or: bindings/c/build/shared/spool_sync 127.0.0.1:PORT SPOOL_DIR,
 * with nothing listening on PORT and SPOOL_DIR a fresh directory)
 *
 * Custody through the C ABI: messages enqueued with a spool are acknowledged with
 * mxp_dispatcher_sync and the durable watermark mxp_dispatcher_durable_id. The relay refuses
 * connections, so every recipient is deferred; a second dispatcher on the same spool finds them
 * again and gives identifiers after the first one's. Prints "spool_sync: 0 failed" when every
 * check holds. Exit status: 0 all checks held, 1 otherwise.
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "mxpipe.h"
#include "util.h"

#define MESSAGES 200

static int failures = 0;

static void expect(int ok, const char *what) {
    printf("%s %s\n", ok ? "ok  " : "FAIL", what);
    if (!ok) {
        failures++;
    }
}

static mxp_dispatcher *start(const char *relay, const char *spool) {
    mxp_config *config = NULL;
    check(mxp_config_new(&config), "mxp_config_new");
    check(mxp_config_set(config, "relay", relay), "relay");
    check(mxp_config_set(config, "connect_timeout", "2s"), "connect_timeout");
    check(mxp_config_set(config, "retry_initial", "1h"), "retry_initial");
    if (spool != NULL) {
        check(mxp_config_set(config, "spool_dir", spool), "spool_dir");
    }
    mxp_dispatcher *dispatcher = NULL;
    check(mxp_dispatcher_new(config, &dispatcher), "mxp_dispatcher_new");
    check(mxp_config_free(config), "mxp_config_free");
    return dispatcher;
}

static const char body[] = "From: sender@example.org\r\n"
                           "Subject: kept in custody\r\n"
                           "\r\n"
                           "Durable before acknowledged.\r\n";

static uint64_t enqueue(mxp_dispatcher *dispatcher, const char *recipient) {
    const char *recipients[] = {recipient};
    uint64_t id = 0;
    check(mxp_dispatcher_enqueue_timeout(dispatcher, "sender@example.org", recipients, 1,
                                         (const uint8_t *)body, strlen(body), 0, 10000, &id),
          "mxp_dispatcher_enqueue_timeout");
    return id;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: spool_sync CLOSED_RELAY SPOOL_DIR\n");
        return 1;
    }
    const char *relay = argv[1];
    const char *spool = argv[2];

    /* Argument checks, before any dispatcher exists. */
    uint64_t untouched = 7;
    expect(mxp_dispatcher_sync(NULL) == MXP_ERR_NULL_POINTER, "sync(NULL) is MXP_ERR_NULL_POINTER");
    expect(mxp_dispatcher_durable_id(NULL, &untouched) == MXP_ERR_NULL_POINTER && untouched == 7,
           "durable_id(NULL, out) is MXP_ERR_NULL_POINTER and leaves *out alone");

    /* Without a spool: nothing to wait for, the watermark is 0. */
    mxp_dispatcher *plain = start(relay, NULL);
    enqueue(plain, "plain@example.net");
    uint64_t watermark = 99;
    expect(mxp_dispatcher_sync(plain) == MXP_OK, "without a spool, sync returns MXP_OK");
    expect(mxp_dispatcher_durable_id(plain, &watermark) == MXP_OK && watermark == 0,
           "without a spool, the durable watermark is 0");
    expect(mxp_dispatcher_durable_id(plain, NULL) == MXP_ERR_NULL_POINTER,
           "durable_id(d, NULL) is MXP_ERR_NULL_POINTER");
    check(mxp_dispatcher_free(plain), "mxp_dispatcher_free");

    /* With a spool: after sync, every identifier given so far is at or below the watermark. */
    mxp_dispatcher *first = start(relay, spool);
    uint64_t last = 0;
    int ordered = 1;
    char recipient[64];
    for (int i = 0; i < MESSAGES; i++) {
        snprintf(recipient, sizeof recipient, "user%d@example.net", i);
        uint64_t id = enqueue(first, recipient);
        ordered &= i == 0 || id == last + 1;
        last = id;
    }
    expect(ordered, "identifiers are given in order");
    expect(mxp_dispatcher_sync(first) == MXP_OK, "sync returns MXP_OK once the spool is durable");
    watermark = 0;
    check(mxp_dispatcher_durable_id(first, &watermark), "mxp_dispatcher_durable_id");
    printf("last id %" PRIu64 ", durable watermark %" PRIu64 "\n", last, watermark);
    expect(watermark >= last, "after sync, the watermark covers the last identifier");
    check(mxp_dispatcher_shutdown(first), "mxp_dispatcher_shutdown");
    watermark = 0;
    expect(mxp_dispatcher_durable_id(first, &watermark) == MXP_OK && watermark >= last,
           "the watermark stays readable after shutdown");
    expect(mxp_dispatcher_sync(first) == MXP_OK, "sync after shutdown returns MXP_OK");
    check(mxp_dispatcher_free(first), "mxp_dispatcher_free");

    /* A second dispatcher on the same spool: the deferred recipients are still in custody and
     * the identifiers go on after the first dispatcher's. */
    mxp_dispatcher *second = start(relay, spool);
    watermark = 0;
    check(mxp_dispatcher_durable_id(second, &watermark), "mxp_dispatcher_durable_id");
    expect(watermark == last, "a restarted dispatcher's watermark is the last durable identifier");
    mxp_stats stats;
    check(mxp_dispatcher_stats(second, &stats), "mxp_dispatcher_stats");
    printf("recovered in_flight %" PRIu64 "\n", stats.in_flight);
    expect(stats.in_flight == MESSAGES, "every deferred recipient was recovered");
    uint64_t next = enqueue(second, "after@example.net");
    expect(next == last + 1, "the next identifier follows the last durable one");
    expect(mxp_dispatcher_sync(second) == MXP_OK, "sync on the restarted dispatcher");
    check(mxp_dispatcher_durable_id(second, &watermark), "mxp_dispatcher_durable_id");
    expect(watermark == next, "the watermark covers the new message");
    check(mxp_dispatcher_free(second), "mxp_dispatcher_free");

    printf("spool_sync: %d failed\n", failures);
    return failures == 0 ? 0 : 1;
}
