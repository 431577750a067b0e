// A GoogleTest fixture base for suites that share one KME network (two real qkd-kms
// daemons) across all their tests: started once in the derived SetUpTestSuite, stopped in
// TearDownTestSuite; every test starts with both daemons serving and `reserve` keys in the
// pool (earlier tests may have drained it), and must leave both daemons serving.
//
//   class MySuite : public qkd::test::SharedNetworkSuite<MySuite> {
//    protected:
//     static void SetUpTestSuite() { start(qkd::test::start_network_with_keys({}, 64), 16); }
//   };
#pragma once
#include <gtest/gtest.h>

#include <cstdint>
#include <memory>

#include "qkd/test/kme_network.hpp"

namespace qkd::test {

template <typename Suite>  // the derived fixture: each suite gets its own network
class SharedNetworkSuite : public ::testing::Test {
 protected:
  static void start(std::unique_ptr<KmeNetwork> net, std::uint64_t reserve) {
    net_ = std::move(net);
    reserve_ = reserve;
  }
  static void TearDownTestSuite() { net_.reset(); }

  void SetUp() override {
    ASSERT_NE(net_, nullptr) << "the KME network did not start";
    ASSERT_TRUE(net_->running(net_->alice()) && net_->running(net_->bob()));
    ASSERT_TRUE(net_->wait_for_keys(reserve_).ok());
  }
  void TearDown() override {
    // Whatever a test did, both daemons must still be serving.
    ASSERT_TRUE(net_->running(net_->alice())) << net_->log_tail(net_->alice());
    ASSERT_TRUE(net_->running(net_->bob())) << net_->log_tail(net_->bob());
  }

  static inline std::unique_ptr<KmeNetwork> net_;
  static inline std::uint64_t reserve_ = 16;
};

}  // namespace qkd::test
