/*
 * Helpers shared by the C test programs: failing with file and line, checking calls that must
 * fail with a given code and message, plain checks, and a monotonic clock.
 */
#ifndef KVT_TEST_CHECK_H
#define KVT_TEST_CHECK_H

#include "kvtransfer.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void fail(const char *file, int line, const char *fmt, ...) {
    va_list ap;
    fprintf(stderr, "%s:%d: ", file, line);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n");
    exit(1);
}

/* A call that must fail with `want` and a message containing `text`. */
#define FAILS(call, want, text)                                                               \
    do {                                                                                      \
        int32_t rc_ = (call);                                                                 \
        const char *msg_ = kvt_last_error_message();                                          \
        if (rc_ != (want))                                                                    \
            fail(__FILE__, __LINE__, "%s returned %d, expected %d (%s): %s", #call, rc_,      \
                 (want), #want, msg_);                                                        \
        if (strstr(msg_, (text)) == NULL)                                                     \
            fail(__FILE__, __LINE__, "%s: message \"%s\" lacks \"%s\"", #call, msg_, (text)); \
        printf("expected error %s: %s\n", #want, msg_);                                       \
    } while (0)

#define CHECK(cond)                                                                           \
    do {                                                                                      \
        if (!(cond)) fail(__FILE__, __LINE__, "check failed: %s", #cond);                     \
    } while (0)

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

#endif
