"""Everything between files on disk and a training batch."""
