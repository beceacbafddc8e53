# bigfile.wl - a large file made from randomness in the xterm: replay's worst case, were the two
# clones' random numbers independent (the file would differ in every block on disk and every page of
# the page cache). They are not yet: both restore the checkpoint's kernel random state and the session
# ends before the kernel reseeds it, so the target's /dev/urandom gives the same bytes (measured:
# 481 KiB shipped instead of 32.7 MiB; README "Security model" on what that means for clones).
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
