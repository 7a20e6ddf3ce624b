#!/usr/bin/env bash
# Build the native uWebSockets peer (server.cpp beside this script) into
# target/uws-native/server, from the uWebSockets and uSockets sources that the crates.io
# package libuwebsockets-sys vendors (pinned below). The crate comes from cargo's registry
# cache, fetched there through a scratch package when missing; g++ from Debian (installed
# with apt-get when missing and running as root). Plain TCP (LIBUS_NO_SSL), no zlib
# (UWS_NO_ZLIB: the peer disables compression), epoll, -O3 -flto. Does nothing when the
# binary is newer than its sources.
#
#   bench/peers/uws-native/build.sh        # prints the binary's path
set -euo pipefail
cd "$(dirname "$0")/../../.."

CRATE=libuwebsockets-sys
VERSION=0.0.10 # vendors uWebSockets v20 (and its uSockets)
OUT=target/uws-native
BIN="$OUT/server"
SRC=bench/peers/uws-native/server.cpp
CARGO_HOME="${CARGO_HOME:-$HOME/.cargo}"

find_crate() { ls -d "$CARGO_HOME"/registry/src/*/"$CRATE-$VERSION" 2>/dev/null | head -1 || true; }

if [ -x "$BIN" ] && [ "$BIN" -nt "$SRC" ] && [ "$BIN" -nt "$0" ] \
   && [ "$(cat "$OUT/VERSION" 2>/dev/null)" = "$VERSION" ]; then
  echo "$BIN"
  exit 0
fi

mkdir -p "$OUT"
UWS="$(find_crate)"
if [ -z "$UWS" ]; then
  # A package outside the workspace whose only dependency is the pinned crate: cargo
  # fetch downloads it (checksum-verified) and unpacks it into the registry's src/.
  scratch="$OUT/fetch"
  mkdir -p "$scratch/src"
  cat > "$scratch/Cargo.toml" <<TOML
[package]
name = "uws-native-fetch"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
$CRATE = "=$VERSION"

[workspace]
TOML
  : > "$scratch/src/lib.rs"
  cargo fetch --quiet --manifest-path "$scratch/Cargo.toml"
  # cargo fetch downloads the .crate; unpacking into src/ happens on first use, so
  # unpack it ourselves when it is still only in the cache.
  UWS="$(find_crate)"
  if [ -z "$UWS" ]; then
    archive="$(ls "$CARGO_HOME"/registry/cache/*/"$CRATE-$VERSION.crate" | head -1)"
    mkdir -p "$OUT/src"
    tar -xzf "$archive" -C "$OUT/src"
    UWS="$OUT/src/$CRATE-$VERSION"
  fi
fi
UWS="$UWS/uWebSockets"
[ -f "$UWS/src/App.h" ] && [ -f "$UWS/uSockets/src/libusockets.h" ] \
  || { echo "build.sh: no uWebSockets sources in $UWS" >&2; exit 1; }

if ! command -v g++ >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >&2
  else
    echo "build.sh: needs g++ (apt-get install g++)" >&2; exit 1
  fi
fi

FLAGS=(-O3 -flto=auto -DLIBUS_NO_SSL -DUWS_NO_ZLIB)
rm -rf "$OUT/obj" && mkdir -p "$OUT/obj"
# uSockets: its core and the epoll backend (the others are #ifdef'd out without their flags).
for c in "$UWS"/uSockets/src/*.c "$UWS"/uSockets/src/eventing/epoll_kqueue.c; do
  gcc "${FLAGS[@]}" -std=c11 -I"$UWS/uSockets/src" -c "$c" -o "$OUT/obj/$(basename "$c" .c).o"
done
g++ "${FLAGS[@]}" -std=c++20 -I"$UWS/src" -I"$UWS/uSockets/src" "$SRC" "$OUT"/obj/*.o -o "$BIN.new"
mv "$BIN.new" "$BIN"
echo "$VERSION" > "$OUT/VERSION"
echo "$BIN"
