# notes.wl - edit and save notes in the notepad.
# Screen 1280x800, no window manager: keyboard focus follows the pointer, so the pointer stays over
# the notepad while typing. Notepad window at +520+0, 500x740: a button bar on top (Save at its
# top-left, ~520..610 x 0..28, then Clear), the text area below. Ctrl-S and Save write /root/notes.txt.

click 770 420                 # into the text area: focus, caret where clicked
wait 0.5
key ctrl+End                  # append after whatever the checkpoint's notes hold
type "\nMeeting notes\n"
type "=============\n"
type "- Migrate the desktop VM by replaying input.\n"
type "- Ship only the blocks that still differ.\n"
wait 1
key ctrl+s                    # save with the keyboard
wait 1.5

# fix a typo the user made on purpose: type, notice, erase, retype
type "- Verify the roots befor"
wait 0.8
key backspace*5
type "before resuming.\n"
key up up End                 # back to the end of the line above, then down again
key ctrl+End
type "Action items: 3 (three)\n"
wait 1

click 560 14                  # the Save button
wait 1.5
move 770 420                  # back over the text so later keys would land here
wait 1
