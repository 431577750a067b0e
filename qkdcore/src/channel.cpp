#include "channel.hpp"

#include "wire.hpp"

namespace qkd::core::detail {

const char* msg_type_name(MsgType t) {
  switch (t) {
    case MsgType::kParams: return "Params";
    case MsgType::kParamsAck: return "ParamsAck";
    case MsgType::kDetections: return "Detections";
    case MsgType::kSiftBases: return "SiftBases";
    case MsgType::kSiftMatch: return "SiftMatch";
    case MsgType::kSample: return "Sample";
    case MsgType::kSampleReply: return "SampleReply";
    case MsgType::kCascadeStart: return "CascadeStart";
    case MsgType::kCascadeRequest: return "CascadeRequest";
    case MsgType::kCascadeReply: return "CascadeReply";
    case MsgType::kVerify: return "Verify";
    case MsgType::kVerifyResult: return "VerifyResult";
    case MsgType::kAmplify: return "Amplify";
    case MsgType::kBlockDone: return "BlockDone";
    case MsgType::kAbort: return "Abort";
  }
  return "unknown";
}

Result<MacKeys> derive_mac_keys(std::span<const std::uint8_t> psk) {
  if (psk.size() < 16) {
    return make_error(ErrorCode::kInvalidArgument,
                      "pre-shared key must be at least 16 bytes, got " +
                          std::to_string(psk.size()));
  }
  constexpr std::string_view kSalt = "qkd-tls bb84 classical channel v1";
  auto ab = hkdf_sha256(psk, kSalt, "mac alice->bob", 32);
  auto ba = hkdf_sha256(psk, kSalt, "mac bob->alice", 32);
  if (!ab.ok()) {
    return ab.error();
  }
  if (!ba.ok()) {
    return ba.error();
  }
  return MacKeys{std::move(ab).value(), std::move(ba).value()};
}

Status AuthChannel::send(MsgType type, std::uint64_t block_id,
                         std::span<const std::uint8_t> payload) {
  Writer w;
  w.reserve(kHeaderBytes + payload.size() + kMacBytes);
  w.u8(kWireVersion);
  w.u8(static_cast<std::uint8_t>(type));
  w.u64(block_id);
  w.u64(send_seq_);
  w.bytes(payload);
  auto tag = hmac_sha256(send_key_.span(), w.buffer());
  if (!tag.ok()) {
    return tag.error();
  }
  w.bytes(*tag);
  ++send_seq_;
  return t_.send(w.take());
}

Result<Frame> AuthChannel::receive(std::chrono::milliseconds timeout, MsgType expected,
                                   std::optional<std::uint64_t> block_id) {
  auto msg = t_.receive(timeout);
  if (!msg.ok()) {
    return msg.error();
  }
  const std::vector<std::uint8_t>& m = *msg;
  if (m.size() < kHeaderBytes + kMacBytes || m.size() > kMaxMessageBytes) {
    return make_error(ErrorCode::kProtocol,
                      "classical message of " + std::to_string(m.size()) + " bytes rejected");
  }
  const std::span<const std::uint8_t> body(m.data(), m.size() - kMacBytes);
  const std::span<const std::uint8_t> tag(m.data() + body.size(), kMacBytes);
  auto expect = hmac_sha256(recv_key_.span(), body);
  if (!expect.ok()) {
    return expect.error();
  }
  if (!constant_time_equal(*expect, tag)) {
    return make_error(ErrorCode::kAuthentication,
                      "classical message failed HMAC verification (tampered or wrong key)");
  }
  Reader r(body);
  std::uint8_t version = 0;
  std::uint8_t type = 0;
  std::uint64_t block = 0;
  std::uint64_t seq = 0;
  if (!r.u8(version) || !r.u8(type) || !r.u64(block) || !r.u64(seq)) {
    return make_error(ErrorCode::kProtocol, "truncated frame header");
  }
  if (version != kWireVersion) {
    return make_error(ErrorCode::kProtocol, "unsupported wire version " + std::to_string(version));
  }
  if (seq != recv_seq_) {
    return make_error(ErrorCode::kProtocol, "sequence number " + std::to_string(seq) +
                                                " where " + std::to_string(recv_seq_) +
                                                " was expected (replayed or reordered)");
  }
  ++recv_seq_;
  std::span<const std::uint8_t> payload;
  if (!r.bytes(r.remaining(), payload)) {
    return make_error(ErrorCode::kInternal, "frame payload");
  }
  if (type == static_cast<std::uint8_t>(MsgType::kAbort)) {
    Reader pr(payload);
    std::string reason;
    if (!pr.string(reason, 1000) || !pr.done()) {
      reason = "(malformed reason)";
    }
    return make_error(ErrorCode::kRejected, "peer aborted block " + std::to_string(block) +
                                                ": " + reason);
  }
  if (block_id && block != *block_id) {
    return make_error(ErrorCode::kProtocol, "message for block " + std::to_string(block) +
                                                " during block " + std::to_string(*block_id));
  }
  if (type != static_cast<std::uint8_t>(expected)) {
    return make_error(ErrorCode::kProtocol,
                      std::string("unexpected message type ") + std::to_string(type) +
                          ", expected " + msg_type_name(expected));
  }
  return Frame{static_cast<MsgType>(type), block,
               std::vector<std::uint8_t>(payload.begin(), payload.end())};
}

void AuthChannel::send_abort(std::uint64_t block_id, const std::string& reason) {
  Writer w;
  w.string(reason.substr(0, 1000));
  (void)send(MsgType::kAbort, block_id, w.buffer());
}

}  // namespace qkd::core::detail
