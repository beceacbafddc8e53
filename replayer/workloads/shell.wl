# shell.wl - a shell session in the xterm at +0+0 (84x56 characters, ~508x732 px).
# No window manager: keyboard focus follows the pointer, which stays over the xterm.
# Every command finishes before the workload ends (waits sized for a TCG guest), and it ends with
# sync so the disk is quiescent.

click 250 400
wait 0.5
type "mkdir -p /root/work && cd /root/work\n"
wait 0.5
type "seq 1 2000 > numbers.txt\n"
type "echo 'hello from replay-migrate' > greeting.txt\n"
type "for i in 1 2 3; do echo \"line $i\" >> lines.txt; done\n"
wait 0.5
type "cat greeting.txt lines.txt > combined.txt\n"
type "cp combined.txt backup.txt\n"
type "sed -i 's/hello/goodbye/' backup.txt\n"
type "sed -n '1,4p' backup.txt\n"
wait 0.5
type "seq 5 5 100 | awk '{s += $1} END {print s}' > sum.txt\n"
type "wc -l *.txt\n"
wait 1
key ctrl+l                    # clear the screen
type "ls -la /root/work\n"
type "cat sum.txt\n"
type "sync\n"
wait 3
