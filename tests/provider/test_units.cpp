// Unit tests: the group table, the wire format, the hybrids' classical half, settings, admission limits, and the ETSI
// client's URL, base64, HTTP and JSON parsing.
#include <gtest/gtest.h>
#include <malloc.h>
#include <openssl/err.h>
#include <openssl/provider.h>

#include <array>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "admission.hpp"
#include "admission_helpers.hpp"
#include "app_errors.hpp"
#include "binding.hpp"
#include "classical.hpp"
#include "groups.hpp"
#include "harness.hpp"
#include "qkd/etsi/client_detail.hpp"
#include "settings.hpp"
#include "wire.hpp"

namespace qkd::prov {
namespace {

using Bytes = std::vector<std::uint8_t>;

Bytes bytes_of(std::initializer_list<int> v) {
  Bytes out;
  for (int b : v) {
    out.push_back(static_cast<std::uint8_t>(b));
  }
  return out;
}

Bytes valid_share(std::string_view sae = "alice") {
  Share s;
  s.sae_id = std::string(sae);
  for (std::size_t i = 0; i < s.nonce.size(); ++i) {
    s.nonce[i] = static_cast<std::uint8_t>(i * 7);
  }
  return encode_share(s).value();
}

TEST(GroupTable, CodepointsAreInThePrivateRangeOutsideOqs) {
  std::set<std::uint16_t> seen;
  for (const auto& g : kGroups) {
    EXPECT_GE(g.default_codepoint, 0xFE3B) << g.tls_name;
    EXPECT_LE(g.default_codepoint, 0xFEFF) << g.tls_name;
    EXPECT_TRUE(seen.insert(g.default_codepoint).second) << "duplicate " << g.tls_name;
  }
  EXPECT_FALSE(codepoint_allowed(0xFE00));
  EXPECT_FALSE(codepoint_allowed(0xFE3A));
  EXPECT_TRUE(codepoint_allowed(0xFE3B));
  EXPECT_FALSE(codepoint_allowed(0xFF00));
  EXPECT_FALSE(codepoint_allowed(0x001D));
}

TEST(GroupTable, HybridRows) {
  ASSERT_EQ(kGroups.size(), 3U);
  EXPECT_EQ(kGroups[1].tls_name, "x25519_qkd");
  EXPECT_EQ(kGroups[1].default_codepoint, 0xFE41);
  EXPECT_EQ(kGroups[1].classical, Classical::kX25519);
  EXPECT_EQ(kGroups[2].tls_name, "p256_qkd");
  EXPECT_EQ(kGroups[2].default_codepoint, 0xFE42);
  EXPECT_EQ(kGroups[2].classical, Classical::kP256);
  EXPECT_EQ(classical_public_length(Classical::kNone), 0U);
  EXPECT_EQ(classical_public_length(Classical::kX25519), 32U);
  EXPECT_EQ(classical_public_length(Classical::kP256), 65U);
  EXPECT_EQ(classical_secret_length(Classical::kP256), 32U);
}

// The classical half alone (default library context): round trip and strict import.
TEST(Classical, EcdhRoundTripBothKinds) {
  for (Classical kind : {Classical::kX25519, Classical::kP256}) {
    auto a = classical_generate(nullptr, kind);
    auto b = classical_generate(nullptr, kind);
    ASSERT_TRUE(a.ok() && b.ok()) << classical_name(kind);
    auto a_pub = classical_public(a->get(), kind);
    auto b_pub = classical_public(b->get(), kind);
    ASSERT_TRUE(a_pub.ok() && b_pub.ok());
    EXPECT_EQ(a_pub->size(), classical_public_length(kind));
    auto a_peer = classical_import_peer(nullptr, kind, *a_pub);
    auto b_peer = classical_import_peer(nullptr, kind, *b_pub);
    ASSERT_TRUE(a_peer.ok() && b_peer.ok()) << classical_name(kind);
    std::array<std::uint8_t, 32> s1{}, s2{};
    ASSERT_TRUE(classical_derive(nullptr, kind, a->get(), b_peer->get(), s1).ok());
    ASSERT_TRUE(classical_derive(nullptr, kind, b->get(), a_peer->get(), s2).ok());
    EXPECT_EQ(s1, s2) << classical_name(kind);
  }
}

// classical_derive checks a P-256 peer with the partial check (cofactor 1: the full check's
// n * Q step cannot fail for an on-curve point); the secret is the one OpenSSL's fully
// checked derive gives, and every peer that passes the full check passes it.
TEST(Classical, P256PartialCheckDerivesWhatTheFullCheckDoes) {
  for (int i = 0; i < 8; ++i) {
    auto own = classical_generate(nullptr, Classical::kP256);
    auto other = classical_generate(nullptr, Classical::kP256);
    ASSERT_TRUE(own.ok() && other.ok());
    auto peer = classical_import_peer(nullptr, Classical::kP256,
                                      classical_public(other->get(), Classical::kP256).value());
    ASSERT_TRUE(peer.ok());
    EVP_PKEY_CTX* check = EVP_PKEY_CTX_new_from_pkey(nullptr, peer->get(), nullptr);
    ASSERT_NE(check, nullptr);
    EXPECT_EQ(EVP_PKEY_public_check(check), 1);  // the full check, n * Q included
    EVP_PKEY_CTX_free(check);
    std::array<std::uint8_t, 32> ours{}, full{};
    ASSERT_TRUE(classical_derive(nullptr, Classical::kP256, own->get(), peer->get(), ours).ok());
    ASSERT_TRUE(qkd::test_prov::openssl_full_check_derive(own->get(), peer->get(), full.data(),
                                                          full.size()));
    EXPECT_EQ(ours, full);
  }
  // A peer on another curve (P-384, a valid key) gives no secret with a P-256 key.
  auto own = classical_generate(nullptr, Classical::kP256);
  ASSERT_TRUE(own.ok());
  PkeyPtr p384(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-384"));
  ASSERT_TRUE(p384);
  std::array<std::uint8_t, 32> out{};
  out.fill(0xAA);
  auto d = classical_derive(nullptr, Classical::kP256, own->get(), p384.get(), out);
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.error().code, qkd::core::ErrorCode::kProtocol);
  EXPECT_EQ(out, (std::array<std::uint8_t, 32>{})) << "cleansed on failure";
}

TEST(Classical, ImportIsStrict) {
  auto p = classical_generate(nullptr, Classical::kP256);
  ASSERT_TRUE(p.ok());
  Bytes pub = classical_public(p->get(), Classical::kP256).value();
  ASSERT_EQ(pub[0], 0x04);
  // Wrong lengths.
  EXPECT_FALSE(classical_import_peer(nullptr, Classical::kP256, std::span(pub).first(64)).ok());
  Bytes longer = pub;
  longer.push_back(0);
  EXPECT_FALSE(classical_import_peer(nullptr, Classical::kP256, longer).ok());
  EXPECT_FALSE(classical_import_peer(nullptr, Classical::kX25519, std::span(pub).first(31)).ok());
  // Compressed form, hybrid form and the point at infinity are not allowed.
  for (std::uint8_t first : {0x00, 0x02, 0x03, 0x06, 0x07}) {
    Bytes b = pub;
    b[0] = first;
    auto r = classical_import_peer(nullptr, Classical::kP256, b);
    ASSERT_FALSE(r.ok()) << int{first};
    EXPECT_EQ(r.error().code, qkd::core::ErrorCode::kProtocol);
  }
  // Off the curve: flip one bit of y.
  Bytes off = pub;
  off[64] ^= 0x01;
  auto r = classical_import_peer(nullptr, Classical::kP256, off);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("not a point on the curve"), std::string::npos);
  // X25519: any 32 bytes import; a small-order point (here 0) yields no secret.
  Bytes zero(32, 0);
  auto peer = classical_import_peer(nullptr, Classical::kX25519, zero);
  ASSERT_TRUE(peer.ok());
  auto own = classical_generate(nullptr, Classical::kX25519);
  ASSERT_TRUE(own.ok());
  std::array<std::uint8_t, 32> out{};
  out.fill(0xAA);
  auto d = classical_derive(nullptr, Classical::kX25519, own->get(), peer->get(), out);
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.error().code, qkd::core::ErrorCode::kProtocol);
  EXPECT_EQ(out, (std::array<std::uint8_t, 32>{})) << "cleansed on failure";
}

// One CryptoMethods (as a provider context holds) serving many calls: P-256 keys from its
// cached parameters, peers imported through it, and HKDF from its cached method, give the
// same results as the per-call path; the off-curve point is still refused.
TEST(Classical, CachedMethodsServeManyCalls) {
  CryptoMethods methods(nullptr);
  EVP_PKEY* params = methods.p256_params();
  ASSERT_NE(params, nullptr);
  EXPECT_EQ(methods.p256_params(), params) << "made once";
  for (int i = 0; i < 3; ++i) {
    for (Classical kind : {Classical::kX25519, Classical::kP256}) {
      auto a = classical_generate(methods, kind);
      auto b = classical_generate(nullptr, kind);
      ASSERT_TRUE(a.ok() && b.ok()) << classical_name(kind);
      auto a_pub = classical_public(a->get(), kind);
      auto b_pub = classical_public(b->get(), kind);
      ASSERT_TRUE(a_pub.ok() && b_pub.ok()) << classical_name(kind);
      auto a_peer = classical_import_peer(nullptr, kind, *a_pub);
      auto b_peer = classical_import_peer(methods, kind, *b_pub);
      ASSERT_TRUE(a_peer.ok() && b_peer.ok()) << classical_name(kind);
      std::array<std::uint8_t, 32> s1{}, s2{};
      ASSERT_TRUE(classical_derive(nullptr, kind, a->get(), b_peer->get(), s1).ok());
      ASSERT_TRUE(classical_derive(nullptr, kind, b->get(), a_peer->get(), s2).ok());
      EXPECT_EQ(s1, s2) << classical_name(kind);
      EXPECT_NE(s1, (std::array<std::uint8_t, 32>{}));
    }
  }
  auto p = classical_generate(methods, Classical::kP256);
  ASSERT_TRUE(p.ok());
  Bytes off = classical_public(p->get(), Classical::kP256).value();
  off[64] ^= 0x01;
  auto r = classical_import_peer(methods, Classical::kP256, off);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, qkd::core::ErrorCode::kProtocol);
  Bytes compressed = classical_public(p->get(), Classical::kP256).value();
  compressed[0] = 0x02;
  EXPECT_FALSE(classical_import_peer(methods, Classical::kP256, compressed).ok());
}

// The provider runs on the application's thread, inside its TLS handshake: a failed step
// drops libcrypto's errors, but only its own; the application's queued errors and its
// ERR_set_mark mark stay (ERR_clear_error() used to wipe them).
TEST(Classical, FailedStepsLeaveTheApplicationsErrorsAndMarks) {
  qkd::test_prov::queue_application_errors();
  auto p = classical_generate(nullptr, Classical::kP256);
  ASSERT_TRUE(p.ok());
  Bytes off = classical_public(p->get(), Classical::kP256).value();
  off[64] ^= 0x01;
  CryptoMethods methods(nullptr);
  EXPECT_FALSE(classical_import_peer(methods, Classical::kP256, off).ok());  // libcrypto raises
  Bytes zero(32, 0);
  auto x = classical_generate(nullptr, Classical::kX25519);
  auto small = classical_import_peer(nullptr, Classical::kX25519, zero);
  ASSERT_TRUE(x.ok() && small.ok());
  std::array<std::uint8_t, 32> out{};
  EXPECT_FALSE(classical_derive(nullptr, Classical::kX25519, x->get(), small->get(), out).ok());
  // A library context with only the null provider: HKDF and EC cannot be fetched.
  OSSL_LIB_CTX* empty = OSSL_LIB_CTX_new();
  ASSERT_NE(empty, nullptr);
  OSSL_PROVIDER* null_prov = OSSL_PROVIDER_load(empty, "null");
  ASSERT_NE(null_prov, nullptr);
  {
    CryptoMethods none(empty);
    EXPECT_EQ(none.new_hkdf(), nullptr);
    EXPECT_EQ(none.p256_params(), nullptr);
    EXPECT_FALSE(classical_generate(none, Classical::kP256).ok());
  }
  OSSL_PROVIDER_unload(null_prov);
  OSSL_LIB_CTX_free(empty);
  qkd::test_prov::expect_only_application_errors();
}

TEST(GroupTable, NamesAndBits) {
  ASSERT_FALSE(kGroups.empty());
  EXPECT_EQ(kGroups[0].tls_name, "qkd");
  EXPECT_EQ(kGroups[0].default_codepoint, 0xFE40);
  for (const auto& g : kGroups) {
    EXPECT_TRUE(valid_group_name(g.tls_name));
    EXPECT_EQ(g.algorithm, g.internal_name);
    EXPECT_GE(g.security_bits, 112U) << "below Debian's SECLEVEL 2";
    EXPECT_EQ(g.qkd_key_bits, 256U);
    EXPECT_EQ(std::string(g.codepoint_setting), std::string(g.tls_name) + "_codepoint");
  }
}

TEST(Wire, ShareRoundTrip) {
  const Bytes b = valid_share("bob.site-1_x");
  ASSERT_EQ(b.size(), 2 + 12 + kNonceLength + 1);
  EXPECT_EQ(b[0], kWireVersion);
  EXPECT_EQ(b.back(), 0);  // no client_id
  auto s = parse_share(b);
  ASSERT_TRUE(s.ok()) << s.error().message;
  EXPECT_EQ(s->sae_id, "bob.site-1_x");
  EXPECT_EQ(s->nonce[3], 21);
  EXPECT_FALSE(s->client_id.has_value());
}

TEST(Wire, ShareWithClientIdRoundTripsAndItsLengthIsStrict) {
  Share share;
  share.sae_id = "alice";
  share.client_id.emplace();
  for (std::size_t i = 0; i < kClientIdLength; ++i) {
    (*share.client_id)[i] = static_cast<std::uint8_t>(0xC0 + i);
  }
  const Bytes b = encode_share(share).value();
  ASSERT_EQ(b.size(), 2 + 5 + kNonceLength + 1 + kClientIdLength);
  EXPECT_EQ(b[2 + 5 + kNonceLength], kClientIdLength);
  auto back = parse_share(b);
  ASSERT_TRUE(back.ok()) << back.error().message;
  ASSERT_TRUE(back->client_id.has_value());
  EXPECT_EQ(*back->client_id, *share.client_id);
  Bytes cut = b;
  cut.pop_back();
  EXPECT_FALSE(parse_share(cut).ok());  // truncated client_id
  Bytes odd = b;
  odd[2 + 5 + kNonceLength] = 8;  // a length other than 0 or 16
  auto r = parse_share(odd);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("client_id length must be 0 or 16"), std::string::npos);
  Bytes none = valid_share();
  none.pop_back();  // the client_id length byte itself is required
  EXPECT_FALSE(parse_share(none).ok());
}

TEST(Wire, ShareRejectsWrongVersion) {
  Bytes b = valid_share();
  EXPECT_EQ(b[0], 0x03);
  b[0] = 0x04;
  auto s = parse_share(b);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().message.find("unknown version 4"), std::string::npos);
  // Version 2 (no client_id, no announcements) is refused with a word on why.
  b[0] = 0x02;
  s = parse_share(b);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().message.find("version 2 (no keys announced ahead)"), std::string::npos)
      << s.error().message;
  b[0] = 0x00;
  EXPECT_FALSE(parse_share(b).ok());
  // Version 1 (same layout, unbound secret) is refused with a word on why.
  b[0] = 0x01;
  s = parse_share(b);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().message.find("version 1 (secret not bound to the handshake)"),
            std::string::npos)
      << s.error().message;
  b[0] = 0x01;
  EXPECT_FALSE(parse_ciphertext(Bytes{0x01, 0x03, 'b', 'o', 'b', 0, 1, 2, 3, 4, 5, 6, 7, 8, 9,
                                      10, 11, 12, 13, 14, 15})
                   .ok());
}

// --- secret derivation (wire version 2) ---------------------------------------------------

struct BindingCase {
  std::array<std::uint8_t, 32> key{};
  Nonce nonce{};
  KeyId key_id{};
  std::string group = "qkd", client = "alice", server = "bob";

  std::array<std::uint8_t, 32> derive() const {
    std::array<std::uint8_t, 32> out{};
    const Binding b{group, client, &nonce, server, &key_id};
    EXPECT_TRUE(derive_bound_key(nullptr, out, key, b).ok());
    return out;
  }
};

TEST(Binding, SameInputsSameSecretAndEveryInputMatters) {
  BindingCase c;
  for (std::size_t i = 0; i < 32; ++i) {
    c.key[i] = static_cast<std::uint8_t>(i);
  }
  const auto base = c.derive();
  EXPECT_EQ(c.derive(), base);
  EXPECT_NE(base, c.key);  // not the KME key itself
  const auto differs = [&](auto change) {
    BindingCase d = c;
    change(d);
    return d.derive() != base;
  };
  EXPECT_TRUE(differs([](BindingCase& d) { d.nonce[0] ^= 1; }));
  EXPECT_TRUE(differs([](BindingCase& d) { d.nonce[15] ^= 0x80; }));
  EXPECT_TRUE(differs([](BindingCase& d) { d.key_id[7] ^= 1; }));
  EXPECT_TRUE(differs([](BindingCase& d) { d.client = "alicf"; }));
  EXPECT_TRUE(differs([](BindingCase& d) { d.server = "bob2"; }));
  EXPECT_TRUE(differs([](BindingCase& d) { d.group = "x25519_qkd"; }));
  EXPECT_TRUE(differs([](BindingCase& d) { d.key[31] ^= 1; }));
  // Length prefixes: moving a character from one SAE ID to the other changes the secret.
  EXPECT_TRUE(differs([](BindingCase& d) {
    d.client = "alicebo";
    d.server = "b";
  }));
}

TEST(Binding, KnownAnswer) {
  // HKDF-SHA256(salt "qkdprovider/2", IKM 32 x 0x11, info 03 "qkd" 05 "alice" 00..0f
  // 03 "bob" 10..1f), computed independently with Python's hmac module (RFC 5869).
  BindingCase c;
  c.key.fill(0x11);
  for (std::size_t i = 0; i < 16; ++i) {
    c.nonce[i] = static_cast<std::uint8_t>(i);
    c.key_id[i] = static_cast<std::uint8_t>(0x10 + i);
  }
  const auto out = c.derive();
  std::string hex;
  for (std::uint8_t v : out) {
    char h[3];
    std::snprintf(h, sizeof h, "%02x", v);
    hex += h;
  }
  EXPECT_EQ(hex, "9287a0e2a132680b9ce2e024e0f89c781d84e1e2564c1003c21ca69a4e11d7e3");
  // The same answer, twice, from one CryptoMethods (HKDF fetched once, as the provider does).
  CryptoMethods methods(nullptr);
  for (int i = 0; i < 2; ++i) {
    std::array<std::uint8_t, 32> again{};
    const Binding b{c.group, c.client, &c.nonce, c.server, &c.key_id};
    ASSERT_TRUE(derive_bound_key(methods, again, c.key, b).ok());
    EXPECT_EQ(again, out);
  }
}

TEST(Binding, IncompleteBindingIsRefused) {
  std::array<std::uint8_t, 32> out{}, key{};
  Nonce nonce{};
  const Binding b{"qkd", "alice", &nonce, "bob", nullptr};
  EXPECT_FALSE(derive_bound_key(nullptr, out, key, b).ok());
}

TEST(Wire, ShareRejectsWrongLengths) {
  EXPECT_FALSE(parse_share({}).ok());
  EXPECT_FALSE(parse_share(bytes_of({1})).ok());
  EXPECT_FALSE(parse_share(bytes_of({1, 0})).ok());          // empty SAE ID
  EXPECT_FALSE(parse_share(bytes_of({1, 65})).ok());         // SAE ID too long
  EXPECT_FALSE(parse_share(bytes_of({1, 5, 'a', 'l'})).ok());  // truncated SAE ID
  Bytes b = valid_share();
  b.pop_back();  // truncated nonce
  EXPECT_FALSE(parse_share(b).ok());
  b = valid_share();
  b[1] = 4;  // length says "alic", the rest no longer adds up
  EXPECT_FALSE(parse_share(b).ok());
}

TEST(Wire, ShareRejectsTrailingBytes) {
  Bytes b = valid_share();
  b.push_back(0);
  auto s = parse_share(b);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().message.find("trailing"), std::string::npos);
}

TEST(Wire, ShareRejectsBadSaeIdCharacters) {
  for (char bad : {' ', '/', ':', '%', '\0', '\n', '?', '@', '\x80'}) {
    Bytes b = valid_share("alice");
    b[3] = static_cast<std::uint8_t>(bad);
    EXPECT_FALSE(parse_share(b).ok()) << "char " << int(bad);
  }
  EXPECT_FALSE(encode_share(Share{"al ice", {}, {}}).ok());
  EXPECT_FALSE(encode_share(Share{std::string(65, 'a'), {}, {}}).ok());
  EXPECT_TRUE(encode_share(Share{std::string(64, 'a'), {}, {}}).ok());
}

TEST(Wire, CiphertextRoundTripAndRejects) {
  auto id = uuid_parse("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0");
  ASSERT_TRUE(id.ok());
  auto ct = encode_ciphertext(Ciphertext{"bob", id.value(), {}});
  ASSERT_TRUE(ct.ok());
  ASSERT_EQ(ct->size(), 2 + 3 + kKeyIdLength + 1);
  ASSERT_EQ(ct->size(), ciphertext_length(3, 0));
  auto back = parse_ciphertext(ct.value());
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->sae_id, "bob");
  EXPECT_EQ(uuid_format(back->key_id), "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0");

  Bytes b = ct.value();
  b.push_back(0);
  EXPECT_FALSE(parse_ciphertext(b).ok());  // trailing
  b = ct.value();
  b.pop_back();
  EXPECT_FALSE(parse_ciphertext(b).ok());  // no ahead_count
  b.pop_back();
  EXPECT_FALSE(parse_ciphertext(b).ok());  // short key_ID
  b = ct.value();
  b[0] = 9;
  EXPECT_FALSE(parse_ciphertext(b).ok());  // version
  b = ct.value();
  b[2] = '<';
  EXPECT_FALSE(parse_ciphertext(b).ok());  // SAE ID char
}

TEST(Wire, CiphertextAnnouncementsRoundTripAndAreParsedStrictly) {
  const KeyId now = uuid_parse("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0").value();
  std::vector<KeyId> ahead(kMaxAhead);
  for (std::size_t i = 0; i < ahead.size(); ++i) {
    ahead[i].fill(static_cast<std::uint8_t>(i + 1));
  }
  auto ct = encode_ciphertext(Ciphertext{"bob", now, ahead});
  ASSERT_TRUE(ct.ok()) << ct.error().message;
  ASSERT_EQ(ct->size(), ciphertext_length(3, kMaxAhead));
  ASSERT_LE(ct->size(), kMaxCiphertextLength);
  auto back = parse_ciphertext(ct.value());
  ASSERT_TRUE(back.ok()) << back.error().message;
  EXPECT_EQ(back->ahead, ahead);
  EXPECT_EQ(back->key_id, now);

  const std::size_t count_at = 2 + 3 + kKeyIdLength;
  const auto rejects = [](const Bytes& b, const char* words) {
    auto r = parse_ciphertext(b);
    ASSERT_FALSE(r.ok()) << words;
    EXPECT_NE(r.error().message.find(words), std::string::npos) << r.error().message;
  };
  Bytes b = ct.value();
  b[count_at] = kMaxAhead + 1;  // more than allowed (and more than the bytes present)
  rejects(b, "at most 32");
  b = ct.value();
  b[count_at] = kMaxAhead - 1;  // count says fewer than the bytes present
  rejects(b, "trailing");
  b = ct.value();
  b.pop_back();  // the last key_ID cut short
  rejects(b, "truncated announced key_IDs");
  b = ct.value();
  std::copy(now.begin(), now.end(), b.begin() + count_at + 1);  // announces the key in use
  rejects(b, "the one used now");
  b = ct.value();
  std::fill(b.begin() + count_at + 1 + kKeyIdLength, b.begin() + count_at + 1 + 2 * kKeyIdLength,
            1);  // the second equals the first
  rejects(b, "announced twice");
  // The encoder refuses what the parser would.
  ahead.push_back(ahead[0]);
  EXPECT_FALSE(encode_ciphertext(Ciphertext{"bob", now, ahead}).ok());
  EXPECT_FALSE(encode_ciphertext(Ciphertext{"bob", now, {now}}).ok());
}

TEST(Wire, Uuid) {
  EXPECT_TRUE(uuid_parse("0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0").ok());
  EXPECT_EQ(uuid_format(uuid_parse("0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0").value()),
            "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0");
  EXPECT_FALSE(uuid_parse("").ok());
  EXPECT_FALSE(uuid_parse("0f1e2d3c4b5a697887 96a5b4c3d2e1f0").ok());
  EXPECT_FALSE(uuid_parse("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1fg").ok());
  EXPECT_FALSE(uuid_parse("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f00").ok());
  EXPECT_FALSE(uuid_parse("0f1e2d3c+4b5a-6978-8796-a5b4c3d2e1f0").ok());
}

TEST(Settings, DefaultsAndCodepointOverride) {
  auto s = resolve_settings({});
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->codepoints[0], 0xFE40);
  EXPECT_EQ(s->timeout.count(), 5000);
  EXPECT_FALSE(s->deferred_error);

  EXPECT_EQ(s->codepoints[1], 0xFE41);
  EXPECT_EQ(s->codepoints[2], 0xFE42);

  s = resolve_settings({{"qkd_codepoint", "0xFE50"}, {"timeout_ms", "2000"}});
  ASSERT_TRUE(s.ok());
  EXPECT_FALSE(s->deferred_error);
  EXPECT_EQ(s->codepoints[0], 0xFE50);
  EXPECT_EQ(s->timeout.count(), 2000);
  s = resolve_settings({{"qkd_codepoint", "65104"}});
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->codepoints[0], 65104);
  s = resolve_settings({{"x25519_qkd_codepoint", "0xFE60"}, {"p256_qkd_codepoint", "0xFE61"}});
  ASSERT_TRUE(s.ok());
  EXPECT_FALSE(s->deferred_error);
  EXPECT_EQ(s->codepoints[1], 0xFE60);
  EXPECT_EQ(s->codepoints[2], 0xFE61);
}

// An override landing on another group's codepoint (default or override) is refused by
// name, and every group keeps its default.
TEST(Settings, CodepointClashIsDeferredAndAllFallBack) {
  auto s = resolve_settings({{"qkd_codepoint", "0xFE41"}});
  ASSERT_TRUE(s.ok());
  ASSERT_TRUE(s->deferred_error);
  EXPECT_NE(s->deferred_error->find("invalid setting qkd_codepoint"), std::string::npos)
      << *s->deferred_error;
  EXPECT_NE(s->deferred_error->find("already used by group x25519_qkd"), std::string::npos)
      << *s->deferred_error;
  for (std::size_t i = 0; i < kGroups.size(); ++i) {
    EXPECT_EQ(s->codepoints[i], kGroups[i].default_codepoint) << kGroups[i].tls_name;
  }
  s = resolve_settings({{"x25519_qkd_codepoint", "0xFE70"}, {"p256_qkd_codepoint", "0xFE70"}});
  ASSERT_TRUE(s.ok());
  ASSERT_TRUE(s->deferred_error);
  EXPECT_NE(s->deferred_error->find("invalid setting p256_qkd_codepoint"), std::string::npos)
      << *s->deferred_error;
  EXPECT_EQ(s->codepoints[1], 0xFE41);
  EXPECT_EQ(s->codepoints[2], 0xFE42);
}

TEST(Settings, HybridCodepointOutOfRangeIsDeferred) {
  for (const char* key : {"x25519_qkd_codepoint", "p256_qkd_codepoint"}) {
    auto s = resolve_settings({{key, "0xFE3A"}});
    ASSERT_TRUE(s.ok());
    ASSERT_TRUE(s->deferred_error) << key;
    EXPECT_NE(s->deferred_error->find(std::string("invalid setting ") + key), std::string::npos);
  }
}

TEST(Settings, CodepointOutOfRangeIsDeferred) {
  for (const char* bad : {"0xFE00", "0xFE3A", "0x10000", "0xFF00", "29", "0x", "fe40", "-1",
                          "0xFE40 ", "999999999999999999999"}) {
    auto s = resolve_settings({{"qkd_codepoint", bad}});
    ASSERT_TRUE(s.ok()) << bad;
    ASSERT_TRUE(s->deferred_error) << bad;
    EXPECT_NE(s->deferred_error->find("invalid setting qkd_codepoint"), std::string::npos);
    EXPECT_EQ(s->codepoints[0], 0xFE40) << "the default stays advertised";
  }
}

TEST(Settings, OtherBadValuesAreDeferredAndNamed) {
  auto s = resolve_settings({{"timeout_ms", "soon"}});
  ASSERT_TRUE(s.ok());
  ASSERT_TRUE(s->deferred_error);
  EXPECT_NE(s->deferred_error->find("timeout_ms"), std::string::npos);
  s = resolve_settings({{"admit_rate", "0"}});
  ASSERT_TRUE(s->deferred_error);
  EXPECT_NE(s->deferred_error->find("admit_rate"), std::string::npos);
  s = resolve_settings({{"admit_rate", "2.5"}, {"admit_burst", "3"}, {"admit_outstanding", "2"}});
  ASSERT_TRUE(s.ok());
  EXPECT_FALSE(s->deferred_error);
  EXPECT_DOUBLE_EQ(s->admission.rate_per_second, 2.5);
  EXPECT_EQ(s->admission.max_outstanding, 2U);
}

TEST(Settings, PrefetchDefaultsAndBounds) {
  auto s = resolve_settings({});
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->prefetch.max_batch, 32U);
  EXPECT_EQ(s->prefetch.max_age.count(), 30000);
  EXPECT_TRUE(s->prefetch.refill_ahead);
  s = resolve_settings({{"prefetch_keys", "1"}, {"prefetch_max_age_ms", "500"}});
  ASSERT_TRUE(s.ok());
  EXPECT_FALSE(s->deferred_error);
  EXPECT_EQ(s->prefetch.max_batch, 1U);
  EXPECT_EQ(s->prefetch.max_age.count(), 500);
  for (const char* bad : {"0", "1025", "many", "-1"}) {
    s = resolve_settings({{"prefetch_keys", bad}});
    ASSERT_TRUE(s->deferred_error) << bad;
    EXPECT_NE(s->deferred_error->find("prefetch_keys"), std::string::npos);
    EXPECT_EQ(s->prefetch.max_batch, 32U);  // the default is kept
  }
  s = resolve_settings({{"prefetch_max_age_ms", "0"}});
  ASSERT_TRUE(s->deferred_error);
  EXPECT_NE(s->deferred_error->find("prefetch_max_age_ms"), std::string::npos);
}

TEST(Settings, AnnouncedKeysDefaultsAndBounds) {
  auto s = resolve_settings({});
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->prefetch.announce, 16U);
  EXPECT_EQ(s->ahead.max_keys, 256U);
  EXPECT_EQ(s->ahead.max_age.count(), 2 * s->prefetch.max_age.count());
  EXPECT_EQ(s->ahead.wait, s->timeout);
  s = resolve_settings({{"announce_keys", "0"}, {"fetch_ahead_keys", "0"},
                        {"prefetch_max_age_ms", "1000"}, {"timeout_ms", "700"}});
  ASSERT_TRUE(s.ok());
  EXPECT_FALSE(s->deferred_error);
  EXPECT_EQ(s->prefetch.announce, 0U);
  EXPECT_EQ(s->ahead.max_keys, 0U);
  EXPECT_EQ(s->ahead.max_age.count(), 2000);
  EXPECT_EQ(s->ahead.wait.count(), 700);
  for (const auto& [name, bad] : std::vector<std::pair<std::string, std::string>>{
           {"announce_keys", "33"}, {"announce_keys", "x"}, {"fetch_ahead_keys", "4097"},
           {"fetch_ahead_keys", "-1"}}) {
    s = resolve_settings({{name, bad}});
    ASSERT_TRUE(s->deferred_error) << name << " = " << bad;
    EXPECT_NE(s->deferred_error->find("invalid setting " + name), std::string::npos)
        << *s->deferred_error;
  }
}

TEST(Admission, TokenBucketPerSae) {
  AdmissionLimits limits;
  limits.rate_per_second = 1;
  limits.burst = 3;
  limits.max_outstanding = 100;
  Admission a(limits);
  const auto t0 = Admission::Clock::now();
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(a.acquire("alice", t0).ok());  // the ticket goes at once: slot released
  }
  auto refused = a.acquire("alice", t0);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.error().message.find("admission limit for SAE alice"), std::string::npos);
  EXPECT_TRUE(a.acquire("bob", t0).ok());  // another SAE has its own bucket
  EXPECT_TRUE(a.acquire("alice", t0 + std::chrono::milliseconds(1100)).ok());  // refilled
}

TEST(Admission, OutstandingCaps) {
  Admission a(test::in_flight_caps(2, 3));
  const auto t = Admission::Clock::now();
  auto held = test::hold(a, {"bob", "alice", "alice"}, t);
  ASSERT_EQ(held.size(), 3U);
  EXPECT_FALSE(a.acquire("alice", t).ok());  // per-SAE cap
  EXPECT_FALSE(a.acquire("carol", t).ok());  // global cap
  held.pop_back();  // one of alice's calls ends
  auto carol = a.acquire("carol", t);
  EXPECT_TRUE(carol.ok());
  EXPECT_FALSE(a.acquire("alice", t).ok());  // global cap again
}

// A ticket releases its slot once, whoever holds it last; a moved-from one releases none.
TEST(Admission, ATicketReleasesItsSlotOnce) {
  Admission a(test::in_flight_caps(1, 2));
  const auto t = Admission::Clock::now();
  const auto bob = test::hold(a, {"bob"}, t);
  ASSERT_EQ(bob.size(), 1U);
  {
    auto first = a.acquire("alice", t);
    ASSERT_TRUE(first.ok());
    AdmissionTicket moved = std::move(first).value();
    EXPECT_FALSE(a.acquire("alice", t).ok());  // still in flight after the move
  }
  auto again = a.acquire("alice", t);
  ASSERT_TRUE(again.ok());  // released once...
  EXPECT_FALSE(a.acquire("carol", t).ok());  // ...not twice: bob and alice fill the total
}

TEST(Admission, TrackedSaesAreBounded) {
  AdmissionLimits limits;
  limits.max_tracked = 4;
  limits.max_outstanding = 1;
  limits.max_outstanding_total = 100;
  Admission a(limits);
  const auto t = Admission::Clock::now();
  {
    std::vector<AdmissionTicket> in_flight;
    for (int i = 0; i < 4; ++i) {
      auto ticket = a.acquire("sae" + std::to_string(i), t);
      ASSERT_TRUE(ticket.ok());
      in_flight.push_back(std::move(ticket).value());
    }
    EXPECT_FALSE(a.acquire("sae9", t).ok());
  }
  // Idle buckets are evicted once refilled.
  EXPECT_TRUE(a.acquire("sae9", t + std::chrono::seconds(10)).ok());
}

}  // namespace
}  // namespace qkd::prov

namespace qkd::etsi::detail {
namespace {

TEST(Url, Accepts) {
  auto u = parse_url("https://127.0.0.1:8443");
  ASSERT_TRUE(u.ok()) << u.error().message;
  EXPECT_EQ(u->host, "127.0.0.1");
  EXPECT_EQ(u->port, 8443);
  EXPECT_TRUE(u->host_is_ip);
  EXPECT_EQ(u->path_prefix, "");
  EXPECT_EQ(u->authority(), "127.0.0.1:8443");
  EXPECT_EQ(u->text, "https://127.0.0.1:8443");

  u = parse_url("https://kme.example.org/prefix/");
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(u->port, 443);
  EXPECT_FALSE(u->host_is_ip);
  EXPECT_EQ(u->path_prefix, "/prefix");
  EXPECT_EQ(u->text, "https://kme.example.org/prefix");

  u = parse_url("https://[::1]:9000");
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(u->host, "::1");
  EXPECT_TRUE(u->host_is_ip);
  EXPECT_EQ(u->authority(), "[::1]:9000");
  EXPECT_TRUE(parse_url("https://localhost").ok());
}

TEST(Url, Rejects) {
  for (const char* bad :
       {"", "http://127.0.0.1:8443", "127.0.0.1:8443", "https://", "https://:8443",
        "https://127.0.0.1:", "https://127.0.0.1:0", "https://127.0.0.1:65536",
        "https://127.0.0.1:84a3", "https://user@host", "https://host/x?y=1", "https://host#f",
        "https://ho st", "https://[::1", "https://[::1]x", "https://256.1.1.1",
        "https://1.2.3", "https://host..example", "https://h\xc3\xa9st", "HTTPS://host"}) {
    EXPECT_FALSE(parse_url(bad).ok()) << bad;
  }
}

std::string decode(std::string_view s) {
  auto r = base64_decode_strict(s);
  if (!r.ok()) {
    return "ERR";
  }
  return std::string(r->data(), r->data() + r->size());
}

TEST(Base64, DecodesCanonical) {
  EXPECT_EQ(decode(""), "");
  EXPECT_EQ(decode("Zg=="), "f");
  EXPECT_EQ(decode("Zm8="), "fo");
  EXPECT_EQ(decode("Zm9v"), "foo");
  EXPECT_EQ(decode("Zm9vYg=="), "foob");
  EXPECT_EQ(decode("+/+/"), "\xfb\xff\xbf");
}

TEST(Base64, IsStrict) {
  for (const char* bad : {"Zg", "Zg=", "Zm9", "Zg==Zg==", "Z===", "====", "Zh==", "Zm9=",
                          " Zm9v", "Zm9v ", "Zm 9v", "Zm9v\n", "Zm-_", "Zm9v====", "=Zm9"}) {
    EXPECT_EQ(decode(bad), "ERR") << bad;
  }
}

TEST(PercentEncode, Segments) {
  EXPECT_EQ(percent_encode("alice"), "alice");
  EXPECT_EQ(percent_encode("a b/c%"), "a%20b%2Fc%25");
}

ResponseParser::State feed(ResponseParser& p, std::string_view s) {
  return p.feed(std::span<const std::uint8_t>(reinterpret_cast<const std::uint8_t*>(s.data()), s.size()));
}

TEST(Http, ContentLengthInPieces) {
  ResponseParser p;
  const std::string r = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: application/json\r\n\r\nhello";
  for (std::size_t i = 0; i + 1 < r.size(); ++i) {
    ASSERT_EQ(feed(p, r.substr(i, 1)), ResponseParser::State::kNeedMore) << i;
  }
  ASSERT_EQ(feed(p, r.substr(r.size() - 1)), ResponseParser::State::kDone);
  EXPECT_EQ(p.status(), 200);
  EXPECT_EQ(p.body(), "hello");
  EXPECT_TRUE(p.keep_alive());
}

TEST(Http, Chunked) {
  ResponseParser p;
  ASSERT_EQ(feed(p, "HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n"
                    "Connection: close\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"),
            ResponseParser::State::kDone);
  EXPECT_EQ(p.status(), 503);
  EXPECT_EQ(p.body(), "abcde");
  EXPECT_FALSE(p.keep_alive());
}

TEST(Http, UntilEof) {
  ResponseParser p;
  ASSERT_EQ(feed(p, "HTTP/1.0 200 OK\r\n\r\nabc"), ResponseParser::State::kNeedMore);
  ASSERT_EQ(p.feed_eof(), ResponseParser::State::kDone);
  EXPECT_EQ(p.body(), "abc");
  EXPECT_FALSE(p.keep_alive());
}

// Counts freed heap blocks that still hold kSecretMarker, while watch_frees is set (the
// replacement operator delete at the end of this file): the client's buffers must be
// cleansed before they are freed.
constexpr std::string_view kSecretMarker = "c2VjcmV0LWtleS1tYXJrZXI";
std::atomic<bool> watch_frees{false};
std::atomic<int> marked_frees{0};

// Responses whose bodies pass through the parser's buffers as they grow and shift: byte by
// byte, in chunks, until EOF.
TEST(Http, BuffersAreCleansedBeforeTheyAreFreed) {
  static constexpr std::string_view kLength =
      "HTTP/1.1 200 OK\r\nContent-Length: 310\r\n\r\n"
      "{\"keys\":[{\"key_ID\":\"id-1\",\"key\":\"c2VjcmV0LWtleS1tYXJrZXI=\"}],\"pad\":\""
      "................................................................................"
      "................................................................................"
      "................................................................................"
      "\"}";
  static constexpr std::string_view kChunked =
      "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
      "34\r\n{\"key\":\"c2VjcmV0LWtleS1tYXJrZXI=\",\"pad\":\"...........\r\n"
      "2\r\n\"}\r\n0\r\n\r\n";
  static constexpr std::string_view kUntilEof =
      "HTTP/1.0 200 OK\r\n\r\n{\"key\":\"c2VjcmV0LWtleS1tYXJrZXI=\"}";
  for (const std::size_t piece : {std::size_t{1}, std::size_t{7}, std::size_t{4096}}) {
    for (const std::string_view r : {kLength, kChunked, kUntilEof}) {
      marked_frees = 0;
      watch_frees = true;
      {
        ResponseParser p;
        for (std::size_t i = 0; i < r.size(); i += piece) {
          feed(p, r.substr(i, piece));
        }
        if (r == kUntilEof) {
          p.feed_eof();
        }
        EXPECT_EQ(p.state(), ResponseParser::State::kDone) << piece << " " << p.error();
        EXPECT_NE(p.body().find(kSecretMarker), std::string::npos);
      }
      watch_frees = false;
      EXPECT_EQ(marked_frees, 0) << "piece " << piece << ", response " << r.substr(0, 40);
    }
  }
}

TEST(Http, Rejects) {
  for (const char* bad : {
           "HTTP/2 200 OK\r\n\r\n", "HTTP/1.1 20 OK\r\n\r\n", "HTTP/1.1 2000 OK\r\n\r\n",
           "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
           "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
           "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
           "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
           "HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
           "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nab",  // bytes after the response
           "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
           "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\naXX",
           "HTTP/1.1 100 Continue\r\n\r\n", "HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
           "HTTP/1.1 200 OK\r\nX: a\x01" "b\r\n\r\n"}) {
    ResponseParser p;
    EXPECT_EQ(feed(p, bad), ResponseParser::State::kError) << bad;
  }
  ResponseParser big;
  EXPECT_EQ(feed(big, "HTTP/1.1 200 OK\r\nX: " + std::string(20000, 'a')),
            ResponseParser::State::kError);
  ResponseParser truncated;
  feed(truncated, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc");
  EXPECT_EQ(truncated.feed_eof(), ResponseParser::State::kError);
}

TEST(Json, KeyContainer) {
  std::string body = R"({"keys":[{"key_ID":"id-1","key":"AAECAw=="}]})";
  auto keys = parse_key_container(body, 1, 4);
  ASSERT_TRUE(keys.ok()) << keys.error().message;
  ASSERT_EQ(keys->size(), 1U);
  EXPECT_EQ(keys->at(0).key_id, "id-1");
  EXPECT_EQ(keys->at(0).key.size(), 4U);
  EXPECT_EQ(keys->at(0).key[3], 3);
}

TEST(Json, KeyContainerRejects) {
  const std::pair<const char*, const char*> cases[] = {
      {"not json", "not valid JSON"},
      {"[]", "not a JSON object"},
      {R"({"key":[]})", "no \"keys\""},
      {R"({"keys":[]})", "got 0"},
      {R"({"keys":[{"key_ID":"a","key":"AAECAw=="},{"key_ID":"b","key":"AAECAw=="}]})", "got 2"},
      {R"({"keys":[{"key_ID":"a","key":"AAECAw="}]})", "base64"},
      {R"({"keys":[{"key_ID":"a","key":"AAEC"}]})", "3 bytes, expected 4"},
      {R"({"keys":[{"key_ID":"","key":"AAECAw=="}]})", "empty"},
      {R"({"keys":[{"key_ID":5,"key":"AAECAw=="}]})", "string fields"},
      {R"({"keys":[{"key":"AAECAw=="}]})", "string fields"},
  };
  for (const auto& [body, want] : cases) {
    std::string b = body;
    auto keys = parse_key_container(b, 1, 4);
    ASSERT_FALSE(keys.ok()) << body;
    EXPECT_NE(keys.error().message.find(want), std::string::npos)
        << body << " -> " << keys.error().message;
  }
  std::string dup = R"({"keys":[{"key_ID":"a","key":"AAECAw=="},{"key_ID":"a","key":"AAECAw=="}]})";
  EXPECT_FALSE(parse_key_container(dup, 2, 4).ok());
}

// Escapes a conformant KME may use inside a key's base64 ("\/", "\u003d") decode as the
// parser would; members named "key" elsewhere, and their values, are left as they were.
TEST(Json, KeyContainerValuesWithEscapes) {
  std::string body =
      R"({"keys":[{"key_ID":"id-1","k\u0065y":"AAEC\/w\u003d\u003d","key_container_extension":)"
      R"({"key":"not base64","note":{"key":[1,2]}}}],"key":7})";
  auto keys = parse_key_container(body, 1, 4);
  ASSERT_TRUE(keys.ok()) << keys.error().message;
  EXPECT_EQ(keys->at(0).key[3], 0xff);
  EXPECT_EQ(body.find_first_not_of('\0'), std::string::npos) << "the body is cleansed";

  const auto scrubbed = scrub_key_values(
      R"({"key" : "c2VjcmV0LWtleS1tYXJrZXI=", "a":{"key":"\u00e9"},"b":["key", "key"],"key":5})");
  EXPECT_EQ(scrubbed.json, R"({"key" : "#0", "a":{"key":"\u00e9"},"b":["key", "key"],"key":5})");
  ASSERT_EQ(scrubbed.values.size(), 1U);
  EXPECT_EQ(std::string(scrubbed.values[0].data(),
                        scrubbed.values[0].data() + scrubbed.values[0].size()),
            std::string(kSecretMarker) + "=");
  EXPECT_EQ(scrubbed_index("#0", 1), 0);
  for (const char* no : {"#1", "#", "0", "#-1", "#0 ", "#00000000000000000000"}) {
    EXPECT_EQ(scrubbed_index(no, 1), -1) << no;
  }

  // Not ASCII, or a bad escape: left for the parser, which refuses it or hands it back.
  std::string accented = R"({"keys":[{"key_ID":"a","key":"AAEC\u00e9w=="}]})";
  auto refused = parse_key_container(accented, 1, 0);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.error().message.find("base64"), std::string::npos) << refused.error().message;
  std::string bad_escape = R"({"keys":[{"key_ID":"a","key":"AAEC\qw=="}]})";
  refused = parse_key_container(bad_escape, 1, 0);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.error().message.find("not valid JSON"), std::string::npos);
  // Where the text stops being JSON, the rest goes: it ends in an unterminated string.
  EXPECT_EQ(scrub_key_values(R"({"key":"AAEC\qw==","a":"b"})").json, R"({"key":")");
  EXPECT_EQ(scrub_key_values(R"({"a":"\q","key":"AAECAw=="})").json, R"({"a":")");
  EXPECT_EQ(scrub_key_values(R"({"a":1,"key":"AAECAw)").json, R"({"a":1,"key":")");
}

// The JSON parser never sees a key's text, so none is left in the blocks it frees (its
// token buffers are freed uncleansed), on success or failure.
TEST(Json, KeyContainerLeavesNoKeyTextInFreedMemory) {
  const std::string key = R"("c2VjcmV0LWtleS1tYXJrZXI=")";
  const std::string pad(300, '.');
  const std::string bodies[] = {
      R"({"keys":[{"key_ID":"id-1","key":)" + key + R"(,"pad":")" + pad + R"("}]})",
      R"({"keys":[{"key_ID":"id-1","key":)" + key + R"(},{"key_ID":"id-2","key":)" + key +
          "}]}",
      R"({"keys":[{"key_ID":"id-1","key":)" + key + R"(}],"extra":[)",  // truncated
      R"({"keys":[{"key_ID":"id-1","key":)" + key + "}]}",                // fewer than asked
      R"({"keys":[{"key_ID":"id-1","key":)" + key.substr(0, key.size() - 1),  // cut short
      R"({"keys":[{"key_ID":"id-1","key":)" + key + ",\"x\":\"",         // cut short after
      R"({"keys":[{"key_ID":"id-1","k\ey":)" + key + "}]}",              // bad escape before
      R"({"keys":[{"key_ID":"i)" "\x01" R"(","key":)" + key + "}]}",    // control character
  };
  for (const std::size_t expected : {std::size_t{1}, std::size_t{2}}) {
    for (const auto& b : bodies) {
      std::string body = b;
      marked_frees = 0;
      watch_frees = true;
      {
        auto keys = parse_key_container(body, expected, 0);
        (void)keys;
      }
      watch_frees = false;
      EXPECT_EQ(marked_frees, 0) << expected << " " << b.substr(0, 60);
    }
  }
}

TEST(Json, StatusAndErrorMessage) {
  const std::string status =
      R"({"source_KME_ID":"a-kme","target_KME_ID":"b-kme","master_SAE_ID":"bob",
          "slave_SAE_ID":"alice","key_size":256,"stored_key_count":10,"max_key_count":100,
          "max_key_per_request":8,"max_key_size":1024,"min_key_size":64,"max_SAE_ID_count":0,
          "status_extension":{"qber":0.01}})";
  auto s = parse_status(status);
  ASSERT_TRUE(s.ok()) << s.error().message;
  EXPECT_EQ(s->target_kme_id, "b-kme");
  EXPECT_EQ(s->stored_key_count, 10);
  EXPECT_NE(s->status_extension_json.find("qber"), std::string::npos);
  EXPECT_FALSE(parse_status(R"({"source_KME_ID":"a"})").ok());
  EXPECT_EQ(parse_error_message(R"({"message":"one or more keys specified are not found on KME"})"),
            "one or more keys specified are not found on KME");
  EXPECT_EQ(parse_error_message("garbage"), "");
  EXPECT_EQ(parse_error_message(R"({"message":"a\nb"})"), "a?b");
}

TEST(Errors, RejectedStatusIsRecoverable) {
  qkd::core::Error e{qkd::core::ErrorCode::kRejected,
                     "key service https://127.0.0.1:1 answered HTTP 400: x"};
  EXPECT_EQ(qkd::etsi::rejected_http_status(e), 400);
  e.code = qkd::core::ErrorCode::kProtocol;
  EXPECT_EQ(qkd::etsi::rejected_http_status(e), 0);
}

}  // namespace
}  // namespace qkd::etsi::detail

// Replacements of the global operator delete, for Http.BuffersAreCleansedBeforeTheyAreFreed.
namespace {
void check_freed(void* p) {
  if (p != nullptr && qkd::etsi::detail::watch_frees.load(std::memory_order_relaxed) &&
      memmem(p, malloc_usable_size(p), qkd::etsi::detail::kSecretMarker.data(),
             qkd::etsi::detail::kSecretMarker.size()) != nullptr) {
    qkd::etsi::detail::marked_frees.fetch_add(1);
  }
}
}  // namespace

// operator new is replaced too, with the malloc() the deletes pair with: AddressSanitizer
// reports a replaced delete's free() of memory from the library's operator new.
void* operator new(std::size_t size) {
  if (void* p = std::malloc(size == 0 ? 1 : size)) {
    return p;
  }
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept {
  check_freed(p);
  std::free(p);
}
void operator delete(void* p, std::size_t /*size*/) noexcept {
  check_freed(p);
  std::free(p);
}
