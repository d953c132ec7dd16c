"""Constants that several floors share (the lowest floor: nothing here imports the library).

They are the release's (docs/release.md sections 1, 5 and 8) and live here once, so that data,
model and the stages above read the same value instead of importing each other for it.
"""
IGNORE_LABEL = 255       # release: object borders, undefined seeds, crop padding of label maps
MEAN_VALUE = 127         # release: the one scalar the graph subtracts from every RGB channel,
                         # and the value images are padded with (section 5), so padding is zero
MAX_REGIONS = 64         # release: superpixels merged down to at most 64 regions (section 8)
NUM_SUPERPIXEL_IDS = MAX_REGIONS + 1   # ids 0..63 plus the pad id of the training crop
