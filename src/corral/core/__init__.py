"""Pure types and logic shared by every component (no I/O, no root)."""
