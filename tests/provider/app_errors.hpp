// The host application's own OpenSSL errors around a provider or ETSI client call, which
// runs on the application's thread: two errors queued with a mark (ERR_set_mark) between
// them before the call; afterwards only they may be left, in order, with the mark working.
#pragma once

#include <gtest/gtest.h>
#include <openssl/err.h>

namespace qkd::test_prov {

// Empties the queue, then queues reason 41, a mark, and reason 42 (library ERR_LIB_USER).
inline void queue_application_errors() {
  ERR_clear_error();
  ERR_raise_data(ERR_LIB_USER, 41, "the application's, below its mark");
  ASSERT_EQ(ERR_set_mark(), 1);
  ERR_raise_data(ERR_LIB_USER, 42, "the application's, above its mark");
}

// Checks that exactly what queue_application_errors() queued is left, and pops it all.
inline void expect_only_application_errors() {
  EXPECT_EQ(ERR_GET_REASON(ERR_peek_last_error()), 42);
  ASSERT_EQ(ERR_pop_to_mark(), 1);
  EXPECT_EQ(ERR_GET_REASON(ERR_peek_last_error()), 41);
  const unsigned long first = ERR_get_error();
  EXPECT_EQ(ERR_GET_LIB(first), ERR_LIB_USER);
  EXPECT_EQ(ERR_GET_REASON(first), 41);
  EXPECT_EQ(ERR_get_error(), 0UL);
}

}  // namespace qkd::test_prov
