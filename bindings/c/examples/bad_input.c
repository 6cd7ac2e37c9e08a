/*
 * Run: make -C bindings/c test
 *   (or: bindings/c/build/shared/bad_input ACCEPTING_RELAY SLOW_RELAY)
 *
 * Every kind of bad input the C API must survive: NULL for each pointer, lengths and counts
 * that do not fit, invalid UTF-8, a NULL entry in the recipient array, handles used after free
 * or freed twice, made-up handles, calls after shutdown, and calls from the wrong thread. Each
 * must return the right code and a readable message, write no output, and never crash.
 * The arguments are a relay that accepts mail at once and one that takes two seconds to answer
 * DATA (smtp-sink -w 2).
 */
#define _POSIX_C_SOURCE 200809L
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "mxpipe.h"
#include "util.h"

static int failures = 0;
static int cases = 0;

/* Checks that `rc` is `want` and that the thread's message contains `needle`. */
static void expect(const char *name, mxp_result rc, mxp_result want, const char *needle) {
    cases++;
    const char *message = rc == MXP_OK ? "" : last_error();
    int ok = rc == want && (needle == NULL || strstr(message, needle) != NULL);
    if (want != MXP_OK && message[0] == '\0') {
        ok = 0;
    }
    printf("%-4s %-52s %-28s %s\n", ok ? "ok" : "FAIL", name, mxp_result_str(rc), message);
    if (!ok) {
        printf("     wanted %s (%d) with \"%s\"\n", mxp_result_str(want), (int)want,
               needle ? needle : "");
        failures++;
    }
}

/* Starts a dispatcher; `settings` is NULL or a NULL-terminated list of key, value pairs. */
static mxp_dispatcher *start(const char *relay, const char *const *settings) {
    mxp_config *config;
    check(mxp_config_new(&config), "mxp_config_new");
    check(mxp_config_set(config, "relay", relay), "relay");
    check(mxp_config_set(config, "connect_timeout", "2s"), "connect_timeout");
    for (; settings && settings[0]; settings += 2) {
        check(mxp_config_set(config, settings[0], settings[1]), settings[0]);
    }
    mxp_dispatcher *d;
    check(mxp_dispatcher_new(config, &d), "mxp_dispatcher_new");
    check(mxp_config_free(config), "mxp_config_free");
    return d;
}

static const uint8_t BODY[] = "Subject: t\r\n\r\nbody\r\n";
#define BODY_LEN (sizeof BODY - 1)
#define SENTINEL UINT64_C(0xdeadbeef)

struct callback_state {
    mxp_dispatcher *dispatcher;
    int calls;
    mxp_result free_result;
    char free_message[MXP_LAST_ERROR_SIZE];
};

static void free_from_callback(void *userdata, const mxp_event *event) {
    (void)event;
    struct callback_state *state = userdata;
    if (state->calls++ == 0) {
        state->free_result = mxp_dispatcher_free(state->dispatcher);
        mxp_last_error(state->free_message, sizeof state->free_message);
    }
}

static void config_cases(void) {
    mxp_config *config = NULL;
    expect("config_new(NULL)", mxp_config_new(NULL), MXP_ERR_NULL_POINTER, "out");
    check(mxp_config_new(&config), "mxp_config_new");
    expect("config_set(NULL config)", mxp_config_set(NULL, "relay", "a:1"),
           MXP_ERR_NULL_POINTER, "config");
    expect("config_set(NULL key)", mxp_config_set(config, NULL, "a:1"), MXP_ERR_NULL_POINTER,
           "key");
    expect("config_set(NULL value)", mxp_config_set(config, "relay", NULL),
           MXP_ERR_NULL_POINTER, "value");
    expect("config_set unknown key", mxp_config_set(config, "relai", "a:1"),
           MXP_ERR_UNKNOWN_KEY, "\"relai\"");
    expect("config_set bad number", mxp_config_set(config, "max_connections_per_destination",
                                                   "zero"),
           MXP_ERR_INVALID_CONFIG, "max_connections_per_destination: \"zero\"");
    expect("config_set bad duration", mxp_config_set(config, "connect_timeout", "soon"),
           MXP_ERR_INVALID_CONFIG, "connect_timeout: \"soon\"");
    expect("config_set bad relay", mxp_config_set(config, "relay", "no-port"),
           MXP_ERR_INVALID_CONFIG, "relay: \"no-port\"");
    expect("config_set key not UTF-8", mxp_config_set(config, "rel\xff", "a:1"),
           MXP_ERR_INVALID_UTF8, "key");
    expect("config_set value not UTF-8", mxp_config_set(config, "ehlo_name", "h\xc3"),
           MXP_ERR_INVALID_UTF8, "ehlo_name");

    mxp_dispatcher *d = (mxp_dispatcher *)0x1;
    expect("dispatcher_new without relay", mxp_dispatcher_new(config, &d),
           MXP_ERR_INVALID_CONFIG, "relay");
    expect("  ...wrote no output", d == (mxp_dispatcher *)0x1 ? MXP_OK : MXP_ERR_PANIC, MXP_OK,
           NULL);
    check(mxp_config_set(config, "relay", "host.invalid:25"), "relay");
    expect("dispatcher_new unresolvable relay", mxp_dispatcher_new(config, &d),
           MXP_ERR_INVALID_CONFIG, "host.invalid:25");
    expect("dispatcher_new(NULL config)", mxp_dispatcher_new(NULL, &d), MXP_ERR_NULL_POINTER,
           "config");
    expect("dispatcher_new(NULL out)", mxp_dispatcher_new(config, NULL), MXP_ERR_NULL_POINTER,
           "out");

    mxp_config *parsed = NULL;
    expect("config_from_toml(NULL)", mxp_config_from_toml(NULL, &parsed), MXP_ERR_NULL_POINTER,
           "toml");
    expect("config_from_toml not TOML", mxp_config_from_toml("relay = ", &parsed),
           MXP_ERR_INVALID_CONFIG, "TOML");
    expect("config_from_toml unknown key", mxp_config_from_toml("nope = 1", &parsed),
           MXP_ERR_UNKNOWN_KEY, "\"nope\"");
    expect("config_from_toml bad value", mxp_config_from_toml("loops = 0", &parsed),
           MXP_ERR_INVALID_CONFIG, "loops: \"0\"");
    expect("  ...wrote no output", parsed == NULL ? MXP_OK : MXP_ERR_PANIC, MXP_OK, NULL);

    expect("config_free", mxp_config_free(config), MXP_OK, NULL);
    expect("config_free twice", mxp_config_free(config), MXP_ERR_BAD_HANDLE, "config handle");
    expect("config_set after free", mxp_config_set(config, "relay", "a:1"),
           MXP_ERR_BAD_HANDLE, "config handle");
    expect("dispatcher_new from freed config", mxp_dispatcher_new(config, &d),
           MXP_ERR_BAD_HANDLE, "config handle");
    expect("config_free(NULL)", mxp_config_free(NULL), MXP_OK, NULL);
}

static void enqueue_cases(mxp_dispatcher *d) {
    const char *good[] = {"a@example.org", "b@example.org"};
    const char *with_null[] = {"a@example.org", NULL};
    const char *crlf[] = {"a@example.org", "b@example.org\r\nRCPT TO:<evil@example.org>"};
    const char *bad_utf8[] = {"\xff@example.org"};
    const char *empty[] = {""};
    char unterminated[300];
    memset(unterminated, 'a', sizeof unterminated); /* no NUL: read at most 255 bytes */
    const char *too_long[] = {unterminated};
    uint64_t id = SENTINEL;

    expect("enqueue(NULL dispatcher)",
           mxp_dispatcher_enqueue(NULL, "s@example.org", good, 2, BODY, BODY_LEN, 0, &id),
           MXP_ERR_NULL_POINTER, "dispatcher");
    expect("enqueue(NULL sender)",
           mxp_dispatcher_enqueue(d, NULL, good, 2, BODY, BODY_LEN, 0, &id), MXP_ERR_NULL_POINTER,
           "sender");
    expect("enqueue(NULL recipients)",
           mxp_dispatcher_enqueue(d, "s@example.org", NULL, 2, BODY, BODY_LEN, 0, &id),
           MXP_ERR_NULL_POINTER, "recipients");
    expect("enqueue(NULL body)",
           mxp_dispatcher_enqueue(d, "s@example.org", good, 2, NULL, 10, 0, &id),
           MXP_ERR_NULL_POINTER, "body");
    expect("enqueue(NULL out_id)",
           mxp_dispatcher_enqueue(d, "s@example.org", good, 2, BODY, BODY_LEN, 0, NULL),
           MXP_ERR_NULL_POINTER, "out_id");
    expect("enqueue NULL recipient entry",
           mxp_dispatcher_enqueue(d, "s@example.org", with_null, 2, BODY, BODY_LEN, 0, &id),
           MXP_ERR_NULL_POINTER, "recipient 1");
    expect("enqueue 0 recipients",
           mxp_dispatcher_enqueue(d, "s@example.org", good, 0, BODY, BODY_LEN, 0, &id),
           MXP_ERR_NO_RECIPIENTS, "no recipients");
    expect("enqueue 0 recipients, NULL array",
           mxp_dispatcher_enqueue(d, "s@example.org", NULL, 0, BODY, BODY_LEN, 0, &id),
           MXP_ERR_NO_RECIPIENTS, "no recipients");
    expect("enqueue recipient count too large",
           mxp_dispatcher_enqueue(d, "s@example.org", good, SIZE_MAX, BODY, BODY_LEN, 0, &id),
           MXP_ERR_INVALID_ARGUMENT, "n_recipients");
    expect("enqueue body_len too large",
           mxp_dispatcher_enqueue(d, "s@example.org", good, 2, BODY, SIZE_MAX, 0, &id),
           MXP_ERR_INVALID_ARGUMENT, "body_len");
    expect("enqueue CRLF in recipient",
           mxp_dispatcher_enqueue(d, "s@example.org", crlf, 2, BODY, BODY_LEN, 0, &id),
           MXP_ERR_INVALID_ADDRESS, "recipient 1: address contains a control character");
    expect("enqueue sender not UTF-8",
           mxp_dispatcher_enqueue(d, "s\xc0@example.org", good, 2, BODY, BODY_LEN, 0, &id),
           MXP_ERR_INVALID_UTF8, "sender: address is not valid UTF-8");
    expect("enqueue recipient not UTF-8",
           mxp_dispatcher_enqueue(d, "s@example.org", bad_utf8, 1, BODY, BODY_LEN, 0, &id),
           MXP_ERR_INVALID_UTF8, "recipient 0");
    expect("enqueue empty recipient",
           mxp_dispatcher_enqueue(d, "s@example.org", empty, 1, BODY, BODY_LEN, 0, &id),
           MXP_ERR_INVALID_ADDRESS, "recipient 0: address is empty");
    expect("enqueue unterminated address",
           mxp_dispatcher_enqueue(d, "s@example.org", too_long, 1, BODY, BODY_LEN, 0, &id),
           MXP_ERR_INVALID_ADDRESS, "recipient 0: address is over 254 octets");
    expect("enqueue sender without @",
           mxp_dispatcher_enqueue(d, "nobody", good, 2, BODY, BODY_LEN, 0, &id),
           MXP_ERR_INVALID_ADDRESS, "sender: address has no '@'");
    static uint8_t long_line[1200];
    memset(long_line, 'x', sizeof long_line);
    memcpy(long_line, "Subject: x\r\n", 12);
    expect("enqueue body line over 998 octets",
           mxp_dispatcher_enqueue(d, "s@example.org", good, 2, long_line, sizeof long_line, 0,
                                  &id),
           MXP_ERR_BODY_LINE_TOO_LONG, "body: line 2 is 1188 octets long");
    expect("  ...no failed call wrote out_id", id == SENTINEL ? MXP_OK : MXP_ERR_PANIC, MXP_OK,
           NULL);

    /* A body with NUL bytes is fine: it is (pointer, length), not a string. */
    static const uint8_t with_nul[] = "Subject: nul\r\n\r\na\0b\r\n";
    expect("enqueue body with a NUL byte",
           mxp_dispatcher_enqueue(d, "", good, 1, with_nul, sizeof with_nul - 1, 0, &id), MXP_OK,
           NULL);
    expect("  ...wrote out_id", id != SENTINEL ? MXP_OK : MXP_ERR_PANIC, MXP_OK, NULL);
    /* (NULL, 0) is an empty body, as (pointer, 0) is. */
    expect("enqueue (NULL, 0) body: an empty body",
           mxp_dispatcher_enqueue(d, "", good, 1, NULL, 0, 0, &id), MXP_OK, NULL);

    /* Prepared bodies. */
    mxp_body *body = NULL;
    expect("body_new(NULL content)", mxp_body_new(NULL, 5, &body), MXP_ERR_NULL_POINTER, "body");
    expect("body_new(NULL, 0): an empty body", mxp_body_new(NULL, 0, &body), MXP_OK, NULL);
    expect("  ...freed", mxp_body_free(body), MXP_OK, NULL);
    expect("body_new(NULL out)", mxp_body_new(BODY, BODY_LEN, NULL), MXP_ERR_NULL_POINTER,
           "out");
    expect("body_new line too long", mxp_body_new(long_line, sizeof long_line, &body),
           MXP_ERR_BODY_LINE_TOO_LONG, "line 2");
    check(mxp_body_new(BODY, BODY_LEN, &body), "mxp_body_new");
    id = SENTINEL;
    expect("enqueue_body(NULL body)",
           mxp_dispatcher_enqueue_body(d, "s@example.org", good, 2, NULL, 0, &id),
           MXP_ERR_NULL_POINTER, "body");
    expect("enqueue_body with a dispatcher as body",
           mxp_dispatcher_enqueue_body(d, "s@example.org", good, 2, (const mxp_body *)d, 0, &id),
           MXP_ERR_BAD_HANDLE, "body handle");
    expect("enqueue_body with a body as dispatcher",
           mxp_dispatcher_enqueue_body((const mxp_dispatcher *)body, "s@example.org", good, 2,
                                       body, 0, &id),
           MXP_ERR_BAD_HANDLE, "dispatcher handle");
    expect("enqueue_body", mxp_dispatcher_enqueue_body(d, "s@example.org", good, 2, body, 0, &id),
           MXP_OK, NULL);
    expect("body_free", mxp_body_free(body), MXP_OK, NULL);
    expect("body_free twice", mxp_body_free(body), MXP_ERR_BAD_HANDLE, "body handle");
    id = SENTINEL;
    expect("enqueue_body after body_free",
           mxp_dispatcher_enqueue_body(d, "s@example.org", good, 2, body, 0, &id),
           MXP_ERR_BAD_HANDLE, "body handle");
    expect("body_free(NULL)", mxp_body_free(NULL), MXP_OK, NULL);

    /* A made-up handle: the address of a local variable. */
    int local = 0;
    expect("enqueue with a made-up handle",
           mxp_dispatcher_enqueue((const mxp_dispatcher *)&local, "s@example.org", good, 2, BODY,
                                  BODY_LEN, 0, &id),
           MXP_ERR_BAD_HANDLE, "dispatcher handle");
    expect("  ...no failed call wrote out_id", id == SENTINEL ? MXP_OK : MXP_ERR_PANIC, MXP_OK,
           NULL);
}

static void event_cases(mxp_dispatcher *d) {
    mxp_event events[4];
    size_t n = 99;
    expect("poll_events(NULL events)", mxp_dispatcher_poll_events(d, NULL, 4, &n),
           MXP_ERR_NULL_POINTER, "events");
    expect("poll_events capacity 0", mxp_dispatcher_poll_events(d, events, 0, &n),
           MXP_ERR_INVALID_ARGUMENT, "capacity");
    expect("poll_events(NULL out_n)", mxp_dispatcher_poll_events(d, events, 4, NULL),
           MXP_ERR_NULL_POINTER, "out_n");
    expect("wait_events capacity too large",
           mxp_dispatcher_wait_events(d, events, SIZE_MAX, 10, &n), MXP_ERR_INVALID_ARGUMENT,
           "capacity");
    expect("  ...wrote no output", n == 99 ? MXP_OK : MXP_ERR_PANIC, MXP_OK, NULL);
    expect("set_callback(NULL callback)", mxp_dispatcher_set_callback(d, NULL, NULL),
           MXP_ERR_NULL_POINTER, "callback");
    expect("stats(NULL out)", mxp_dispatcher_stats(d, NULL), MXP_ERR_NULL_POINTER, "out");
    expect("stats(NULL dispatcher)", mxp_dispatcher_stats(NULL, NULL), MXP_ERR_NULL_POINTER,
           "dispatcher");
    expect("flush(NULL)", mxp_dispatcher_flush(NULL), MXP_ERR_NULL_POINTER, "dispatcher");
    expect("wait_final(NULL)", mxp_dispatcher_wait_final(NULL, 10), MXP_ERR_NULL_POINTER,
           "dispatcher");
    expect("shutdown(NULL)", mxp_dispatcher_shutdown(NULL), MXP_ERR_NULL_POINTER, "dispatcher");
}

static void error_api_cases(void) {
    char small[4] = {'x', 'x', 'x', 'x'};
    mxp_config_new(NULL); /* leaves "out: NULL pointer" as the last error */
    cases++;
    if (mxp_last_error(small, sizeof small) != MXP_ERR_BUFFER_TOO_SMALL || small[0] != 'x') {
        printf("FAIL last_error into a small buffer must write nothing\n");
        failures++;
    } else {
        printf("ok   last_error into a small buffer                  MXP_ERR_BUFFER_TOO_SMALL\n");
    }
    cases++;
    if (mxp_last_error(NULL, 100) != MXP_ERR_NULL_POINTER ||
        mxp_last_error_len() != strlen("out: NULL pointer") + 1) {
        printf("FAIL last_error(NULL) / last_error_len\n");
        failures++;
    } else {
        printf("ok   last_error(NULL), last_error_len                MXP_ERR_NULL_POINTER\n");
    }
    cases++;
    if (strcmp(mxp_result_str(999), "unknown result code") != 0 ||
        strcmp(mxp_result_str(MXP_ERR_QUEUE_FULL), "the dispatcher's ingress queue is full") !=
            0) {
        printf("FAIL result_str\n");
        failures++;
    } else {
        printf("ok   result_str(999), result_str(QUEUE_FULL)\n");
    }
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s ACCEPTING_RELAY SLOW_RELAY\n", argv[0]);
        return 1;
    }
    const char *relay = argv[1];
    const char *slow_relay = argv[2];
    setvbuf(stdout, NULL, _IOLBF, 0);

    config_cases();
    error_api_cases();

    mxp_dispatcher *d = start(relay, NULL);
    enqueue_cases(d);
    event_cases(d);

    /* A full queue: once the loop holds one recipient (in a transaction with the slow relay,
       which answers DATA after 2 s) and the queue holds one message, the next message finds
       the queue full, at once or after a short timeout. */
    const char *const tiny_settings[] = {"queue_capacity", "1", "max_queued_recipients", "1",
                                         NULL};
    mxp_dispatcher *tiny = start(slow_relay, tiny_settings);
    const char *one[] = {"a@example.org"};
    uint64_t id;
    check(mxp_dispatcher_enqueue(tiny, "s@example.org", one, 1, BODY, BODY_LEN, 0, &id), "enqueue");
    mxp_stats stats;
    for (int i = 0; i < 1000; i++) {
        check(mxp_dispatcher_stats(tiny, &stats), "mxp_dispatcher_stats");
        if (stats.connections_opened > 0) {
            break;
        }
        struct timespec pause = {0, 10 * 1000 * 1000};
        nanosleep(&pause, NULL);
    }
    check(mxp_dispatcher_enqueue(tiny, "s@example.org", one, 1, BODY, BODY_LEN, 0, &id), "enqueue");
    expect("enqueue into a full queue",
           mxp_dispatcher_enqueue(tiny, "s@example.org", one, 1, BODY, BODY_LEN, 0, &id),
           MXP_ERR_QUEUE_FULL, "queue full");
    expect("enqueue_timeout into a full queue",
           mxp_dispatcher_enqueue_timeout(tiny, "s@example.org", one, 1, BODY, BODY_LEN, 0, 50, &id),
           MXP_ERR_QUEUE_FULL, "queue full");
    check(mxp_dispatcher_free(tiny), "mxp_dispatcher_free");

    /* Events turned off. */
    const char *const quiet_settings[] = {"record_events", "false", NULL};
    mxp_dispatcher *quiet = start(relay, quiet_settings);
    mxp_event events[4];
    size_t n;
    expect("poll_events with events off", mxp_dispatcher_poll_events(quiet, events, 4, &n),
           MXP_ERR_EVENTS_UNAVAILABLE, "record_events");
    expect("set_callback with events off",
           mxp_dispatcher_set_callback(quiet, free_from_callback, NULL),
           MXP_ERR_EVENTS_UNAVAILABLE, "record_events");
    check(mxp_dispatcher_free(quiet), "mxp_dispatcher_free");

    /* A recipient that cannot be delivered yet: wait_final times out. The relay refuses
       connections, so the recipient is deferred and retried in 5 minutes. Freeing the
       dispatcher from its own callback is refused. */
    mxp_dispatcher *stuck = start("127.0.0.1:9", NULL);
    struct callback_state state = {.dispatcher = stuck, .calls = 0, .free_result = MXP_OK};
    expect("set_callback", mxp_dispatcher_set_callback(stuck, free_from_callback, &state), MXP_OK,
           NULL);
    expect("set_callback twice", mxp_dispatcher_set_callback(stuck, free_from_callback, &state),
           MXP_ERR_INVALID_ARGUMENT, "set already");
    expect("poll_events with a callback set", mxp_dispatcher_poll_events(stuck, events, 4, &n),
           MXP_ERR_EVENTS_UNAVAILABLE, "callback");
    check(mxp_dispatcher_enqueue(stuck, "s@example.org", one, 1, BODY, BODY_LEN, 0, &id), "enqueue");
    expect("wait_final times out", mxp_dispatcher_wait_final(stuck, 300), MXP_ERR_TIMED_OUT,
           "after 300 ms");
    check(mxp_dispatcher_free(stuck), "mxp_dispatcher_free");
    cases++;
    if (state.calls < 1 || state.free_result != MXP_ERR_CALLBACK_CONTEXT) {
        printf("FAIL dispatcher_free from its callback: calls=%d result=%s\n", state.calls,
               mxp_result_str(state.free_result));
        failures++;
    } else {
        printf("ok   %-52s %-28s %s\n", "dispatcher_free from its own callback",
               mxp_result_str(state.free_result), state.free_message);
    }

    /* After shutdown: work is refused, reading is not. */
    expect("wait_final", mxp_dispatcher_wait_final(d, 10000), MXP_OK, NULL);
    expect("shutdown", mxp_dispatcher_shutdown(d), MXP_OK, NULL);
    expect("shutdown again", mxp_dispatcher_shutdown(d), MXP_OK, NULL);
    expect("enqueue after shutdown",
           mxp_dispatcher_enqueue(d, "s@example.org", one, 1, BODY, BODY_LEN, 0, &id),
           MXP_ERR_SHUT_DOWN, "shut down");
    mxp_body *body;
    check(mxp_body_new(BODY, BODY_LEN, &body), "mxp_body_new");
    expect("enqueue_body_timeout after shutdown",
           mxp_dispatcher_enqueue_body_timeout(d, "s@example.org", one, 1, body, 0, 100, &id),
           MXP_ERR_SHUT_DOWN, "shut down");
    check(mxp_body_free(body), "mxp_body_free");
    expect("flush after shutdown", mxp_dispatcher_flush(d), MXP_ERR_SHUT_DOWN, "shut down");
    expect("wait_final after shutdown", mxp_dispatcher_wait_final(d, 10), MXP_ERR_SHUT_DOWN,
           "shut down");
    expect("set_callback after shutdown",
           mxp_dispatcher_set_callback(d, free_from_callback, NULL), MXP_ERR_SHUT_DOWN,
           "shut down");
    expect("stats after shutdown", mxp_dispatcher_stats(d, &stats), MXP_OK, NULL);
    expect("poll_events after shutdown", mxp_dispatcher_poll_events(d, events, 4, &n), MXP_OK,
           NULL);

    /* After free: every call is refused, nothing crashes. */
    expect("dispatcher_free", mxp_dispatcher_free(d), MXP_OK, NULL);
    expect("dispatcher_free twice", mxp_dispatcher_free(d), MXP_ERR_BAD_HANDLE,
           "dispatcher handle");
    expect("enqueue after free",
           mxp_dispatcher_enqueue(d, "s@example.org", one, 1, BODY, BODY_LEN, 0, &id),
           MXP_ERR_BAD_HANDLE, "was freed already");
    expect("stats after free", mxp_dispatcher_stats(d, &stats), MXP_ERR_BAD_HANDLE,
           "dispatcher handle");
    expect("poll_events after free", mxp_dispatcher_poll_events(d, events, 4, &n),
           MXP_ERR_BAD_HANDLE, "dispatcher handle");
    expect("flush after free", mxp_dispatcher_flush(d), MXP_ERR_BAD_HANDLE, "dispatcher handle");
    expect("shutdown after free", mxp_dispatcher_shutdown(d), MXP_ERR_BAD_HANDLE,
           "dispatcher handle");
    expect("dispatcher_free(NULL)", mxp_dispatcher_free(NULL), MXP_OK, NULL);

    printf("bad_input: %d cases, %d failed\n", cases, failures);
    return failures == 0 ? 0 : 1;
}
