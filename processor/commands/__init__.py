"""What operators run: one module per ``votebox`` command, each registering its own flags."""
