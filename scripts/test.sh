#!/usr/bin/env bash
# The one test command: installs what the tests need when it is missing (Debian packages for
# the real etcd and ZooKeeper servers, protoc for the etcd client, Apache Curator for the
# ZooKeeper interop test, py-consul for the Consul simulator's fidelity test), then runs every
# test with every feature.
# Extra arguments go to `cargo test` (for example `scripts/test.sh --test conformance`).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
[ -f /usr/share/java/zookeeper.jar ] || need+=(zookeeper)
[ -f /usr/share/java/curator-recipes.jar ] || need+=(libcurator-recipes-java)
command -v javac >/dev/null 2>&1 || need+=(openjdk-17-jdk-headless)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  echo "installing: ${need[*]}" >&2
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${need[@]}"
fi

# py-consul, an independent Consul client, drives the Consul simulator in a fidelity test.
if ! python3 -c "import consul" >/dev/null 2>&1; then
  if ! python3 -m pip --version >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    echo "installing: python3-pip" >&2
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q python3 python3-pip
  fi
  echo "installing: py-consul (pip)" >&2
  PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --disable-pip-version-check py-consul \
    || echo "warning: py-consul could not be installed; the Consul fidelity test will be skipped" >&2
fi

cargo test --all-features "$@"
