#!/bin/bash
# Build the rig guest (kernel + initramfs) into /var/cache/lmwatch-rig/guest-<hash>/
# and point /var/cache/lmwatch-rig/current at it.  The hash covers the guest
# sources (writer.c, init, this script): unchanged sources => nothing is rebuilt.
# The Debian 6.1 kernel is fetched once (apt-get download) and kept in
# /var/cache/lmwatch-rig/kernel/.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
CACHE="${LMWATCH_RIG_CACHE:-/var/cache/lmwatch-rig}"
mkdir -p "$CACHE/kernel"

# the virtio block driver and what it needs, in load order (modules of the Debian
# kernel; the disk variant of the guest loads them from /modules in the initramfs)
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk)
hash=$(cat "$HERE/writer.c" "$HERE/diskw.c" "$HERE/init" "$HERE/build.sh" | sha256sum | cut -c1-16)
out="$CACHE/guest-$hash"
if [[ -s "$out/vmlinuz" && -s "$out/initrd.img" ]]; then
    ln -sfn "guest-$hash" "$CACHE/current"
    echo "guest: cached $out"
    exit 0
fi

# --- kernel: reuse any cached 6.1 kernel, else download the newest one apt knows
kdir=$(ls -d "$CACHE"/kernel/linux-image-6.1.0-*-amd64 2>/dev/null | sort -V | tail -1 || true)
if [[ -z "$kdir" || ! -s "$kdir/vmlinuz" || ! -s "$kdir/modules/virtio_blk.ko" ]]; then
    pkg=$(apt-cache pkgnames linux-image-6.1.0- | grep -E '^linux-image-6\.1\.0-[0-9]+-amd64$' | sort -V | tail -1)
    # a kernel cached before the modules were kept: fetch that same version again
    [[ -n "$kdir" && -s "$kdir/vmlinuz" ]] && pkg=$(basename "$kdir")
    [[ -n "$pkg" ]] || { echo "guest: no linux-image-6.1.0-*-amd64 known to apt (apt-get update?)" >&2; exit 1; }
    tmp=$(mktemp -d); chmod 755 "$tmp"; chown _apt "$tmp" 2>/dev/null || true   # apt downloads as _apt
    echo "guest: downloading $pkg"
    (cd "$tmp" && apt-get download -q "$pkg" >/dev/null)
    dpkg-deb -x "$tmp"/linux-image-*.deb "$tmp/x"
    kdir="$CACHE/kernel/$pkg"
    mkdir -p "$kdir"
    mkdir -p "$kdir/modules"
    for m in "${MODULES[@]}"; do
        f=$(find "$tmp/x/lib/modules" -name "$m.ko" | head -1)
        [[ -n "$f" ]] || { echo "guest: module $m not in $pkg" >&2; exit 1; }
        cp "$f" "$kdir/modules/$m.ko"
    done
    cp "$tmp"/x/boot/vmlinuz-* "$kdir/vmlinuz.tmp" && mv "$kdir/vmlinuz.tmp" "$kdir/vmlinuz"
    rm -rf "$tmp"
fi

# --- initramfs: busybox-static + /init + static writer
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
root="$tmp/root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp}
cp /bin/busybox "$root/bin/busybox"
file_ok=$(ldd "$root/bin/busybox" 2>&1 || true)
case "$file_ok" in *"not a dynamic"*|*"statically linked"*) ;; *) echo "guest: /bin/busybox is not static (install busybox-static)" >&2; exit 1;; esac
ln -s busybox "$root/bin/sh"
install -m 0755 "$HERE/init" "$root/init"
gcc -O2 -static -Wall -o "$root/writer" "$HERE/writer.c"
gcc -O2 -static -Wall -o "$root/diskw" "$HERE/diskw.c"
mkdir -p "$root/modules"
for m in "${MODULES[@]}"; do cp "$kdir/modules/$m.ko" "$root/modules/"; done
mknod -m 600 "$root/dev/console" c 5 1
mknod -m 666 "$root/dev/null" c 1 3
mknod -m 660 "$root/dev/ttyS0" c 4 64
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$tmp/initrd.img"

mkdir -p "$out.tmp"
cp "$kdir/vmlinuz" "$out.tmp/vmlinuz"
cp "$tmp/initrd.img" "$out.tmp/initrd.img"
basename "$kdir" > "$out.tmp/KERNEL"
rm -rf "$out" && mv "$out.tmp" "$out"
ln -sfn "guest-$hash" "$CACHE/current"
# drop guests built from older sources (running rig guests keep their open files)
find "$CACHE" -maxdepth 1 -name 'guest-*' ! -name "guest-$hash" -exec rm -rf {} +
echo "guest: built $out ($(basename "$kdir"), initrd $(stat -c %s "$out/initrd.img") bytes)"
