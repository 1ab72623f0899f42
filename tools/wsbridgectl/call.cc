#include "tools/wsbridgectl/call.h"

#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <functional>
#include <iostream>
#include <mutex>

#include <google/protobuf/dynamic_message.h>
#include <google/protobuf/util/json_util.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/client_callback.h>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "tools/wsbridgectl/status_print.h"

namespace wsbridge::ctl {
namespace {

namespace pb = google::protobuf;

// stdout and stderr are written from the gRPC callback thread and the main thread.
std::mutex output_mu;

void PrintLine(FILE* stream, const std::string& line) {
  std::lock_guard<std::mutex> lock(output_mu);
  std::fwrite(line.data(), 1, line.size(), stream);
  std::fputc('\n', stream);
  // Streams print as messages arrive, also into a pipe.
  std::fflush(stream);
}

void PrintStatusLocked(const grpc::Status& status) {
  std::lock_guard<std::mutex> lock(output_mu);
  std::fflush(stdout);
  PrintStatus(status, std::cerr);
  std::cerr.flush();
}

grpc::ByteBuffer ToByteBuffer(const std::string& bytes) {
  grpc::Slice slice(bytes);
  return grpc::ByteBuffer(&slice, 1);
}

std::string FromByteBuffer(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string bytes;
  if (!buffer.Dump(&slices).ok()) return bytes;
  for (const auto& slice : slices) {
    bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  return bytes;
}

// Reads stdin in chunks; returns early when `wake_fd` becomes readable (the call ended).
class StdinReader {
 public:
  explicit StdinReader(int wake_fd) : wake_fd_(wake_fd) {}
  enum class Result { kData, kEof, kWoken, kError };
  Result Read(std::string* out) {
    for (;;) {
      pollfd fds[2] = {{STDIN_FILENO, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
      const int n = poll(fds, wake_fd_ >= 0 ? 2 : 1, -1);
      if (n < 0) {
        if (errno == EINTR) continue;
        return Result::kError;
      }
      if (wake_fd_ >= 0 && (fds[1].revents & POLLIN)) return Result::kWoken;
      if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
        char buf[65536];
        const ssize_t got = read(STDIN_FILENO, buf, sizeof(buf));
        if (got < 0) {
          if (errno == EINTR || errno == EAGAIN) continue;
          return Result::kError;
        }
        if (got == 0) return Result::kEof;
        out->assign(buf, static_cast<size_t>(got));
        return Result::kData;
      }
    }
  }

 private:
  int wake_fd_;
};

// A request JSON text -> serialized request, or the parse error naming what is wrong.
class RequestEncoder {
 public:
  explicit RequestEncoder(const pb::Descriptor& type)
      : prototype_(factory_.GetPrototype(&type)), type_(type) {}

  absl::StatusOr<std::string> Encode(const std::string& json, const std::string& where) {
    std::unique_ptr<pb::Message> message(prototype_->New());
    std::string text(absl::StripAsciiWhitespace(json));
    if (text.empty()) text = "{}";
    pb::util::JsonParseOptions options;
    options.ignore_unknown_fields = false;
    auto status = pb::util::JsonStringToMessage(text, message.get(), options);
    if (!status.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(where, " is not a valid ", type_.full_name(),
                                                     ": ", status.message().as_string()));
    }
    return message->SerializeAsString();
  }

 private:
  pb::DynamicMessageFactory factory_;
  const pb::Message* prototype_;
  const pb::Descriptor& type_;
};

class ResponsePrinter {
 public:
  ResponsePrinter(const pb::Descriptor& type, bool emit_defaults)
      : prototype_(factory_.GetPrototype(&type)) {
    options_.preserve_proto_field_names = true;
    options_.always_print_primitive_fields = emit_defaults;
  }
  void Print(const std::string& bytes) {
    std::unique_ptr<pb::Message> message(prototype_->New());
    std::string json;
    if (!message->ParseFromString(bytes)) {
      PrintLine(stderr, absl::StrCat("wsbridgectl: a response (", bytes.size(),
                                     " bytes) does not parse as ",
                                     message->GetDescriptor()->full_name()));
      return;
    }
    auto status = pb::util::MessageToJsonString(*message, &json, options_);
    if (!status.ok()) {
      PrintLine(stderr, absl::StrCat("wsbridgectl: cannot print a response as JSON: ",
                                     status.message().as_string()));
      return;
    }
    PrintLine(stdout, json);
  }

 private:
  pb::DynamicMessageFactory factory_;
  const pb::Message* prototype_;
  pb::util::JsonPrintOptions options_;
};

// Every streaming shape (client, server, bidi) on the wire is a bidi call: the writer
// (main thread) sends requests one at a time, the reactor prints responses as they come.
class StreamingCall : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  StreamingCall(grpc::ClientContext& context, ResponsePrinter& printer, bool verbose)
      : context_(context), printer_(printer), verbose_(verbose) {
    if (pipe2(wake_, O_CLOEXEC) != 0) wake_[0] = wake_[1] = -1;
  }
  ~StreamingCall() override {
    if (wake_[0] >= 0) close(wake_[0]);
    if (wake_[1] >= 0) close(wake_[1]);
  }

  void Start(grpc::GenericStub& stub, const std::string& path) {
    stub.PrepareBidiStreamingCall(&context_, path, grpc::StubOptions(), this);
    // Held until the writer is done, so that OnDone never runs while it may still write.
    AddHold();
    StartRead(&read_buffer_);
    StartCall();
  }

  // Blocks until the request is written; false once the call is over.
  bool Write(const std::string& bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (reads_over_) return false;
      writing_ = true;
    }
    write_buffer_ = ToByteBuffer(bytes);
    StartWrite(&write_buffer_);
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return !writing_; });
    return write_ok_;
  }

  // The writer is done: half-close (when the call is still open) and let it finish.
  void DoneWriting(bool half_close) {
    if (half_close) StartWritesDone();
    RemoveHold();
  }

  grpc::Status Await() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return done_; });
    return status_;
  }

  // Readable once the server has ended the call.
  int wake_fd() const { return wake_[0]; }

  void OnReadInitialMetadataDone(bool ok) override {
    if (!ok || !verbose_) return;
    std::lock_guard<std::mutex> lock(output_mu);
    std::cerr << "< headers\n";
    PrintMetadata(context_.GetServerInitialMetadata(), "< ", std::cerr);
    std::cerr.flush();
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        reads_over_ = true;
      }
      if (wake_[1] >= 0) (void)!write(wake_[1], "x", 1);
      return;
    }
    printer_.Print(FromByteBuffer(read_buffer_));
    StartRead(&read_buffer_);
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(mu_);
    writing_ = false;
    write_ok_ = ok;
    cv_.notify_all();
  }

  void OnDone(const grpc::Status& status) override {
    std::lock_guard<std::mutex> lock(mu_);
    status_ = status;
    done_ = true;
    cv_.notify_all();
  }

 private:
  grpc::ClientContext& context_;
  ResponsePrinter& printer_;
  const bool verbose_;
  grpc::ByteBuffer read_buffer_;
  grpc::ByteBuffer write_buffer_;
  int wake_[2] = {-1, -1};

  std::mutex mu_;
  std::condition_variable cv_;
  bool writing_ = false;
  bool write_ok_ = false;
  bool reads_over_ = false;
  bool done_ = false;
  grpc::Status status_;
};

void PrintTrailers(const grpc::ClientContext& context) {
  std::lock_guard<std::mutex> lock(output_mu);
  std::cerr << "< trailers\n";
  PrintMetadata(context.GetServerTrailingMetadata(), "< ", std::cerr);
  std::cerr.flush();
}

int Finished(const grpc::Status& status, const grpc::ClientContext& context, bool verbose) {
  if (verbose) PrintTrailers(context);
  if (status.ok()) return kExitOk;
  PrintStatusLocked(status);
  return kExitFailed;
}

int Usage(const std::string& message) {
  PrintLine(stderr, absl::StrCat("wsbridgectl call: ", message));
  return kExitUsage;
}

absl::StatusOr<std::string> ReadAllStdin() {
  if (isatty(STDIN_FILENO)) {
    PrintLine(stderr, "wsbridgectl: reading the request JSON from stdin (end it with Ctrl-D)");
  }
  std::string all;
  StdinReader reader(-1);
  std::string chunk;
  for (;;) {
    switch (reader.Read(&chunk)) {
      case StdinReader::Result::kData: all += chunk; break;
      case StdinReader::Result::kEof: return all;
      default: return absl::UnavailableError(absl::StrCat("reading stdin: ", std::strerror(errno)));
    }
  }
}

}  // namespace

void JsonSplitter::Feed(std::string_view bytes) { pending_.append(bytes); }

std::optional<std::string> JsonSplitter::Next() {
  size_t i = 0;
  for (; i < pending_.size(); ++i) {
    const char c = pending_[i];
    if (current_.empty() && absl::ascii_isspace(static_cast<unsigned char>(c))) continue;
    current_.push_back(c);
    if (in_string_) {
      if (escaped_) {
        escaped_ = false;
      } else if (c == '\\') {
        escaped_ = true;
      } else if (c == '"') {
        in_string_ = false;
      }
      continue;
    }
    bool end = false;
    if (c == '"') {
      in_string_ = true;
    } else if (c == '{' || c == '[') {
      ++depth_;
    } else if (c == '}' || c == ']') {
      end = --depth_ <= 0;
    } else if (c == '\n' && depth_ <= 0) {
      end = true;  // a line that is not an object: let the parser say what is wrong
    }
    if (end) {
      std::string value = std::move(current_);
      current_.clear();
      depth_ = 0;
      pending_.erase(0, i + 1);
      return value;
    }
  }
  pending_.clear();
  return std::nullopt;
}

std::optional<std::string> JsonSplitter::Rest() {
  if (auto value = Next()) return value;
  std::string rest(absl::StripAsciiWhitespace(current_));
  current_.clear();
  depth_ = 0;
  in_string_ = escaped_ = false;
  if (rest.empty()) return std::nullopt;
  return rest;
}

int RunCall(const GlobalOptions& options, const std::shared_ptr<grpc::Channel>& channel,
            const pb::MethodDescriptor& method, const std::optional<std::string>& json_argument) {
  const bool client_streaming = method.client_streaming();
  const bool server_streaming = method.server_streaming();
  const std::string path =
      absl::StrCat("/", method.service()->full_name(), "/", method.name());
  RequestEncoder encoder(*method.input_type());
  ResponsePrinter printer(*method.output_type(), options.emit_defaults);
  const bool from_stdin = !json_argument.has_value() || *json_argument == "-";

  // Requests known before the call starts: the argument, or all of stdin when the
  // method takes one request. Every one is checked before anything is sent.
  std::vector<std::string> requests;
  if (!from_stdin || !client_streaming) {
    std::string text;
    if (from_stdin) {
      auto all = ReadAllStdin();
      if (!all.ok()) return Usage(std::string(all.status().message()));
      text = *std::move(all);
    } else {
      text = *json_argument;
    }
    const std::string where = from_stdin ? "the request on stdin" : "the JSON argument";
    JsonSplitter splitter;
    splitter.Feed(text);
    splitter.Feed("\n");
    std::vector<std::string> values;
    while (auto value = splitter.Next()) values.push_back(*std::move(value));
    if (auto rest = splitter.Rest()) values.push_back(*std::move(rest));
    if (values.empty()) values.push_back("{}");  // no input: the empty request
    if (!client_streaming && values.size() > 1) {
      return Usage(absl::StrCat(method.full_name(), " takes one request; ", where, " holds ",
                                values.size(), " JSON values"));
    }
    for (size_t i = 0; i < values.size(); ++i) {
      auto bytes = encoder.Encode(
          values[i], values.size() > 1 ? absl::StrCat(where, " (value ", i + 1, ")") : where);
      if (!bytes.ok()) return Usage(std::string(bytes.status().message()));
      requests.push_back(*std::move(bytes));
    }
  }

  grpc::GenericStub stub(channel);
  grpc::ClientContext context;
  PrepareContext(options, /*streaming=*/client_streaming || server_streaming, context);

  if (!client_streaming && !server_streaming) {
    grpc::ByteBuffer request = ToByteBuffer(requests.front());
    grpc::ByteBuffer response;
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    grpc::Status status;
    stub.UnaryCall(&context, path, grpc::StubOptions(), &request, &response,
                   [&](grpc::Status s) {
                     std::lock_guard<std::mutex> lock(mu);
                     status = std::move(s);
                     done = true;
                     cv.notify_all();
                   });
    {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return done; });
    }
    if (options.verbose) {
      std::lock_guard<std::mutex> lock(output_mu);
      std::cerr << "< headers\n";
      PrintMetadata(context.GetServerInitialMetadata(), "< ", std::cerr);
    }
    if (status.ok()) printer.Print(FromByteBuffer(response));
    return Finished(status, context, options.verbose);
  }

  StreamingCall call(context, printer, options.verbose);
  call.Start(stub, path);
  if (!from_stdin || !client_streaming) {
    bool open = true;
    for (const auto& bytes : requests) {
      if (!(open = call.Write(bytes))) break;
    }
    call.DoneWriting(/*half_close=*/open);
    return Finished(call.Await(), context, options.verbose);
  }

  // Client and bidi streams from stdin: one request per JSON value as it arrives, so
  // a conversation can be driven line by line; EOF half-closes.
  StdinReader reader(call.wake_fd());
  JsonSplitter splitter;
  int count = 0;
  bool open = true;
  bool at_eof = false;
  auto send = [&](const std::string& json) -> std::optional<int> {
    ++count;
    auto bytes = encoder.Encode(json, absl::StrCat("request ", count, " on stdin"));
    if (!bytes.ok()) {
      // Nothing more is sent; the call is cancelled and the bad line named.
      context.TryCancel();
      call.DoneWriting(/*half_close=*/false);
      call.Await();
      return Usage(std::string(bytes.status().message()));
    }
    open = call.Write(*bytes);
    return std::nullopt;
  };
  std::string chunk;
  while (open && !at_eof) {
    while (open) {
      auto value = splitter.Next();
      if (!value) break;
      if (auto exit_code = send(*value)) return *exit_code;
    }
    if (!open) break;
    switch (reader.Read(&chunk)) {
      case StdinReader::Result::kData:
        splitter.Feed(chunk);
        break;
      case StdinReader::Result::kEof:
        at_eof = true;
        if (auto rest = splitter.Rest()) {
          if (auto exit_code = send(*rest)) return *exit_code;
        }
        break;
      case StdinReader::Result::kWoken:
        open = false;  // the server ended the call: its status says why
        break;
      case StdinReader::Result::kError:
        PrintLine(stderr, absl::StrCat("wsbridgectl: reading stdin: ", std::strerror(errno)));
        context.TryCancel();
        open = false;
        break;
    }
  }
  call.DoneWriting(/*half_close=*/open);
  return Finished(call.Await(), context, options.verbose);
}

}  // namespace wsbridge::ctl
