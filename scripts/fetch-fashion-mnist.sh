#!/usr/bin/env bash
# Make Fashion-MNIST available for `make demo` via the Debian package dataset-fashion-mnist,
# which installs the four IDX .gz files under /usr/share/datasets/fashion-mnist (the default
# data root of `--dataset fashion-mnist`). Never fails: the demo reports missing data itself.
set -u
DIR=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}  # override only for testing
FILES="train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte"

have_all() {
    for f in $FILES; do
        [ -s "$DIR/$f.gz" ] || [ -s "$DIR/$f" ] || return 1
    done
}

if have_all; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; then
        # The package lists may be missing or stale (fresh containers): refresh once and retry.
        apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1
    fi
    if have_all; then
        echo "fetch-fashion-mnist: installed dataset-fashion-mnist into $DIR"
        exit 0
    fi
fi
echo "fetch-fashion-mnist: Fashion-MNIST not found in $DIR; install it with 'sudo apt-get install dataset-fashion-mnist' or run 'adafilter' with --dataset fashion-mnist --download --data-root DIR"
exit 0
