/* Small helpers shared by the examples: fail loudly with mxpipe's own message. */
#ifndef MXPIPE_EXAMPLE_UTIL_H
#define MXPIPE_EXAMPLE_UTIL_H

#include <stdio.h>
#include <stdlib.h>

#include "mxpipe.h"

/* The detailed message of the latest failure on this thread. */
static inline const char *last_error(void) {
    static _Thread_local char buf[MXP_LAST_ERROR_SIZE];
    if (mxp_last_error(buf, sizeof buf) != MXP_OK) {
        return "(no message)";
    }
    return buf;
}

/* Exits when `rc` is not MXP_OK, printing what failed and why. */
static inline void check(mxp_result rc, const char *what) {
    if (rc != MXP_OK) {
        fprintf(stderr, "%s: %s (%d): %s\n", what, mxp_result_str(rc), (int)rc, last_error());
        exit(1);
    }
}

#endif
