#!/bin/sh
# Run inside the image build (Dockerfile stage `installer`): a new virtual environment at VENV holding exactly
# the wheels of LOCK, installed from /wheels without any index and checked against the lock's sha256; pip and
# setuptools are removed after, since nothing installs at run time.
#
#   install-lock.sh VENV LOCK        # e.g. install-lock.sh /opt/venv /tmp/requirements-cpu.txt
set -eu
venv=${1:?usage: $0 VENV LOCK}
lock=${2:?usage: $0 VENV LOCK}
python3 -m venv "$venv"
"$venv/bin/pip" install --no-index --find-links /wheels --require-hashes -r "$lock"
"$venv/bin/pip" uninstall --yes --quiet pip setuptools
