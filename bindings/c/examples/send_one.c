/*
 * Run: make -C bindings/c test   (or: bindings/c/build/shared/send_one 127.0.0.1:2525 rcpt@example.org)
 *
 * Sends one message to one recipient through a relay and prints its outcome. The message is
 * enqueued with the tag 42, which comes back in its events.
 * Exit status: 0 delivered, 2 another final outcome, 1 an error.
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "mxpipe.h"
#include "util.h"

int main(int argc, char **argv) {
    const char *relay = argc > 1 ? argv[1] : "127.0.0.1:2525";
    const char *recipient = argc > 2 ? argv[2] : "someone@example.org";
    printf("mxpipe %s\n", mxp_version());

    mxp_config *config = NULL;
    check(mxp_config_new(&config), "mxp_config_new");
    check(mxp_config_set(config, "relay", relay), "relay");
    check(mxp_config_set(config, "ehlo_name", "send-one.example"), "ehlo_name");
    check(mxp_config_set(config, "connect_timeout", "5s"), "connect_timeout");
    mxp_dispatcher *dispatcher = NULL;
    check(mxp_dispatcher_new(config, &dispatcher), "mxp_dispatcher_new");
    check(mxp_config_free(config), "mxp_config_free");

    static const char body[] =
        "From: sender@example.org\r\n"
        "To: someone@example.org\r\n"
        "Subject: hello from C\r\n"
        "\r\n"
        "One message, one recipient.\r\n";
    const char *recipients[] = {recipient};
    uint64_t id = 0;
    check(mxp_dispatcher_enqueue_timeout(dispatcher, "sender@example.org", recipients, 1,
                                         (const uint8_t *)body, strlen(body), 42, 10000, &id),
          "mxp_dispatcher_enqueue_timeout");
    printf("enqueued message %" PRIu64 "\n", id);

    /* Read outcomes until the recipient's final one (deferrals are events too). */
    mxp_event event;
    for (;;) {
        size_t n = 0;
        check(mxp_dispatcher_wait_events(dispatcher, &event, 1, 30000, &n),
              "mxp_dispatcher_wait_events");
        if (n == 0) {
            fprintf(stderr, "no outcome within 30 s\n");
            return 1;
        }
        printf("%s: %s %u %u.%u.%u \"%s\"%s via %s (message %" PRIu64 ", tag %" PRIu64
               ", attempt %u, category %s)\n",
               event.recipient, mxp_event_kind_str(event.kind), event.code, event.enhanced_class,
               event.enhanced_subject, event.enhanced_detail, event.text,
               event.text_truncated ? " (cut)" : "", event.destination, event.message_id,
               event.tag, event.attempts, mxp_category_str(event.category));
        if (event.kind != MXP_EVENT_KIND_DEFERRED) {
            break;
        }
    }

    mxp_stats stats;
    check(mxp_dispatcher_stats(dispatcher, &stats), "mxp_dispatcher_stats");
    printf("stats: submitted=%" PRIu64 " delivered=%" PRIu64 " bounced=%" PRIu64
           " in_flight=%" PRIu64 " connections_opened=%" PRIu64 "\n",
           stats.submitted_messages, stats.delivered, stats.bounced, stats.in_flight,
           stats.connections_opened);
    check(mxp_dispatcher_free(dispatcher), "mxp_dispatcher_free");
    return event.kind == MXP_EVENT_KIND_DELIVERED ? 0 : 2;
}
