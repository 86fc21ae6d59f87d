"""The toy world: drawn scenes with checkable captions, and the toy CLIP and text-to-image models trained on them.

world     scene records, drawings, captions, reading a caption back into attributes
scenes    the three disjoint scene sets (models / captions / eval)
dataset   the world as a Karpathy-format caption dataset with scene records; the shipped copy
train_clip, train_t2i   the two trainers (resumable, seeded); resume: their state files
quality   how good the toy models are; score: per-attribute accuracy of an evaluate stage
manifest  sizes and sha256 of the shipped weights
"""
