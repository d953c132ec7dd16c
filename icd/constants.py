"""Constants that several floors share (the lowest floor: nothing here imports the library).

They are the release's (docs/release.md sections 1, 5 and 8) and live here once, so that data,
model and the stages above read the same value instead of importing each other for it.
"""
IGNORE_LABEL = 255       # release: object borders, undefined seeds, crop padding of label maps
MEAN_VALUE = 127         # release: the one scalar the graph subtracts from every RGB channel,
                         # and the value images are padded with (section 5), so padding is zero
MAX_REGIONS = 64         # release: superpixels merged down to at most 64 regions (section 8)
NUM_SUPERPIXEL_IDS = MAX_REGIONS + 1   # ids 0..63 plus the pad id of the training crop

# The choices of configuration fields (icd.config), read there without loading the modules that
# implement them (MXNet)
FEATURES = ("conv4", "conv5", "fc6", "concat")   # Table 5: features for the bottom-up estimation
TOP_DOWN = ("a", "b", "c", "d")                   # Table 6: structures of the top-down branch
BOTTOM_UP_VARIANTS = ("bu", "abs", "sig")         # Table 4: L_bu, L_abs, L_sig
OPTIMIZERS = ("sgd", "adam")                      # adam: only the demo's stand-in pre-training
KVSTORES = ("device", "local", "dist_sync", "dist_device_sync", "dist_sync_device")
PRECISIONS = ("off", "bf16", "fp16")              # icd.amp
