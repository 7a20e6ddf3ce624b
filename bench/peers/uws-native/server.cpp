// uWebSockets in C++ (the library under uWebSockets.js, without Node) speaking
// herald-bench's protocol, as bench/peers/uws-server.js does:
//   /ws?topics=a,b   subscribe; each topic is confirmed with {"op":"subscribed","topic":..}
//   POST /publish    {"topic":t,"data":..} -> {"op":"message","topic":t,"id":N,"data":..}
//                    to every subscriber, through uWS's native pub/sub; replies {id,delivered}
//   /echo            echoes every message
//   GET /health      ok
// Port: argv[1], else PORT, else 9003. Built by build.sh beside it, started by
// bench/compare.sh. Bodies are parsed by hand (the topic's string, data's raw text): the
// bench sends well-formed JSON, and data goes out verbatim.
#include "App.h"
#include <cstdlib>
#include <iostream>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

struct Subscriber { std::vector<std::string> topics; };
struct Echoer {};

// The end of the JSON value starting at s[i] (a string, an array or object, or a scalar).
static size_t skip_value(std::string_view s, size_t i) {
    int depth = 0;
    bool in_string = false;
    for (; i < s.size(); i++) {
        char c = s[i];
        if (in_string) {
            if (c == '\\') i++;
            else if (c == '"') { in_string = false; if (depth == 0) return i + 1; }
        } else if (c == '"') in_string = true;
        else if (c == '[' || c == '{') depth++;
        else if (c == ']' || c == '}') { if (depth == 0) return i; if (--depth == 0) return i + 1; }
        else if (depth == 0 && (c == ',' || c == ' ' || c == '\n' || c == '\r' || c == '\t')) return i;
    }
    return i;
}

// The raw value of "key" in a flat JSON object, or nullopt.
static std::optional<std::string_view> field(std::string_view body, std::string_view key) {
    std::string quoted = "\"" + std::string(key) + "\"";
    size_t at = body.find(quoted);
    if (at == std::string_view::npos) return std::nullopt;
    at = body.find_first_not_of(" \t\r\n", at + quoted.size());
    if (at == std::string_view::npos || body[at] != ':') return std::nullopt;
    at = body.find_first_not_of(" \t\r\n", at + 1);
    if (at == std::string_view::npos) return std::nullopt;
    return body.substr(at, skip_value(body, at) - at);
}

int main(int argc, char **argv) {
    const char *port_text = argc > 1 ? argv[1] : std::getenv("PORT");
    int port = port_text ? std::atoi(port_text) : 9003;
    std::unordered_map<std::string, uint64_t> ids;
    uWS::App app;

    app.ws<Subscriber>("/ws", {
        .compression = uWS::DISABLED, .maxPayloadLength = 64 * 1024, .idleTimeout = 0,
        .maxBackpressure = 16 * 1024 * 1024,
        .upgrade = [](auto *res, auto *req, auto *context) {
            Subscriber data;
            std::string_view list = req->getQuery("topics");
            while (!list.empty()) {
                size_t comma = list.find(',');
                std::string_view topic = list.substr(0, comma);
                if (!topic.empty()) data.topics.emplace_back(topic);
                list = comma == std::string_view::npos ? std::string_view() : list.substr(comma + 1);
            }
            res->template upgrade<Subscriber>(std::move(data), req->getHeader("sec-websocket-key"),
                req->getHeader("sec-websocket-protocol"), req->getHeader("sec-websocket-extensions"), context);
        },
        .open = [](auto *ws) {
            for (const std::string &topic : ws->getUserData()->topics) {
                ws->subscribe(topic);
                ws->send("{\"op\":\"subscribed\",\"topic\":\"" + topic + "\"}", uWS::OpCode::TEXT);
            }
        },
    });
    app.ws<Echoer>("/echo", {
        .compression = uWS::DISABLED, .maxPayloadLength = 64 * 1024, .idleTimeout = 0,
        .maxBackpressure = 16 * 1024 * 1024,
        .message = [](auto *ws, std::string_view message, uWS::OpCode op) { ws->send(message, op); },
    });
    app.post("/publish", [&app, &ids](auto *res, auto * /*req*/) {
        res->onAborted([] {});
        res->onData([&app, &ids, res, body = std::string()](std::string_view chunk, bool last) mutable {
            body.append(chunk);
            if (!last) return;
            auto topic = field(body, "topic");
            auto data = field(body, "data");
            if (!topic || topic->size() < 2 || topic->front() != '"' || !data) {
                res->writeStatus("400 Bad Request")->end("bad publish body\n");
                return;
            }
            std::string name(topic->substr(1, topic->size() - 2));
            uint64_t id = ++ids[name];
            std::string message = "{\"op\":\"message\",\"topic\":\"" + name + "\",\"id\":" +
                std::to_string(id) + ",\"data\":" + std::string(*data) + "}";
            unsigned int delivered = app.numSubscribers(name);
            app.publish(name, message, uWS::OpCode::TEXT, false);
            res->cork([res, id, delivered] {
                res->writeHeader("Content-Type", "application/json")
                    ->end("{\"id\":" + std::to_string(id) + ",\"delivered\":" + std::to_string(delivered) + "}");
            });
        });
    });
    app.get("/health", [](auto *res, auto * /*req*/) { res->end("ok\n"); });
    app.listen("127.0.0.1", port, [port](auto *token) {
        if (!token) { std::cerr << "cannot listen on " << port << std::endl; std::exit(1); }
        std::cerr << "listening on 127.0.0.1:" << port << std::endl;
    });
    app.run();
}
