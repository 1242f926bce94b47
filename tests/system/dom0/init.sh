#!/bin/sh
# gblk system suite: dom0's per-boot init (PID 1), run from the host's 9p share by the
# image's /usr/sbin/gblk-lab-init. Brings up what a Debian Xen host has (xenfs, the Xen
# device modules, xenstored, xenconsoled logging guest consoles into the share), runs
# payload.py under a hard time limit (it installs gblk's .deb), then powers off through
# sysrq (Xen enters S5 and QEMU exits 0). Must never exit: PID 1 exiting panics dom0.
# Not systemd: see docs/testing.md ("gblk as the package installs it") for why, and
# payload.py/service.py for how the installed gblk.service is started instead.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export LANG=C.UTF-8
S=/mnt/share
R=$S/results
mkdir -p "$R/logs" "$R/consoles"
stamp() { echo "@@DOM0 $(cut -d' ' -f1 /proc/uptime) $*"; }
stamp "init start"

mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/lock /run/xen
mount -t tmpfs tmpfs /tmp
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
hostname gblk-dom0
ip link set lo up

# Xen's device modules; xen-blkback only when the payload asks (it claims every vbd)
for m in xen-privcmd xenfs xen-evtchn xen-gntdev xen-gntalloc loop; do
    modprobe "$m" || stamp "modprobe $m failed"
done
mount -t xenfs xenfs /proc/xen
if grep -q '"blkback": true' "$S/config.json"; then
    modprobe xen-blkback
fi

# gblk itself is not here: the payload installs the .deb in the share ($S/deb) with
# apt-get, as an operator does, and starts the installed unit (scenario "install")

cat >> /etc/default/xen <<EOT
XENCONSOLED_ARGS="--log=guest --log-dir=$R/consoles --timestamp=guest"
EOT
stamp "xen start"
timeout 120 /etc/init.d/xen start
stamp "xen started rc=$?"
xl info > "$R/logs/xl-info.txt" 2>&1

T=$(sed -n 's/.*"payload_timeout": *\([0-9]*\).*/\1/p' "$S/config.json")
stamp "payload start (limit ${T:-1500} s)"
timeout -k 10 "${T:-1500}" python3 "$S/dom0/payload.py" "$S"
stamp "payload exit rc=$?"

xl list > "$R/logs/xl-list-final.txt" 2>&1
xl dmesg > "$R/logs/xl-dmesg.txt" 2>&1
dmesg > "$R/logs/dom0-dmesg.txt" 2>&1
cp -r /var/log/xen "$R/logs/var-log-xen" 2>/dev/null
sync
stamp "poweroff"
echo o > /proc/sysrq-trigger
# Wait with shell builtins only: the power-off takes the disk away first, and PID 1
# failing to exec `sleep` from it would panic dom0 (Xen then halts, QEMU never exits).
while :; do :; done
