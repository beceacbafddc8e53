# bigfile.wl - replay's worst case: the user makes a large file from randomness in the xterm.
# The target types the same command, but its /dev/urandom gives other bytes: the file differs in
# every block on disk and in every page of the page cache, and all of it must be shipped.
# xterm at +0+0 (84x56 characters, ~508x732 px); no window manager, focus follows the pointer.
# Ends with the file written and synced (waits sized for a TCG guest: ~10 s for 32 MiB).

click 250 400
wait 0.5
type "head -c 32M /dev/urandom > /root/big.bin && sync && echo written\n"
wait 15                       # generate and write it
type "ls -l /root/big.bin\n"
wait 1
type "sync\n"
wait 3
