// The host application's own OpenSSL errors around a provider or ETSI client call, which
// runs on the application's thread: two errors queued, with a mark (ERR_set_mark) on each,
// before the call; afterwards only they may be left, in order, with both marks working.
#pragma once

#include <gtest/gtest.h>
#include <openssl/err.h>

namespace qkd::test_prov {

// Empties the queue, then queues reason 41, a mark, reason 42 and a mark on it (library
// ERR_LIB_USER). The mark on the newest entry is where a callee's own ERR_set_mark goes.
inline void queue_application_errors() {
  ERR_clear_error();
  ERR_raise_data(ERR_LIB_USER, 41, "the application's, below its first mark");
  ASSERT_EQ(ERR_set_mark(), 1);
  ERR_raise_data(ERR_LIB_USER, 42, "the application's, below its second mark");
  ASSERT_EQ(ERR_set_mark(), 1);
}

// Checks that exactly what queue_application_errors() queued is left, and pops it all.
// (An emptied queue, as libssl's handshake leaves it, fails on the first line.)
inline void expect_only_application_errors() {
  ASSERT_EQ(ERR_GET_REASON(ERR_peek_last_error()), 42) << "the application's errors are gone";
  ASSERT_EQ(ERR_pop_to_mark(), 1);  // the second mark: pops nothing
  EXPECT_EQ(ERR_GET_REASON(ERR_peek_last_error()), 42) << "the second mark is gone";
  ASSERT_EQ(ERR_pop_to_mark(), 1);  // the first mark: pops 42
  EXPECT_EQ(ERR_GET_REASON(ERR_peek_last_error()), 41);
  const unsigned long first = ERR_get_error();
  EXPECT_EQ(ERR_GET_LIB(first), ERR_LIB_USER);
  EXPECT_EQ(ERR_GET_REASON(first), 41);
  EXPECT_EQ(ERR_get_error(), 0UL);
}

// Queues the application's errors, runs `call` (which checks its own outcome), and checks
// that they are left as they were; `what` names the case in failure messages.
template <typename F>
void expect_call_leaves_application_errors(const char* what, F&& call) {
  SCOPED_TRACE(what);
  queue_application_errors();
  call();
  expect_only_application_errors();
}

}  // namespace qkd::test_prov
