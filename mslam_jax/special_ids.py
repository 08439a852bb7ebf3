"""Reserved ids of the character vocabulary, shared by the model, losses and data.

The first ids follow seqio's convention (0 = pad, 1 = EOS, 2 = UNK); MASK is
ours, for SpanBERT/TLM masking. CTC's blank reuses the pad id, which never
occurs inside a transcript, so the CTC head needs no extra output.
"""

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
MASK_ID = 3
NUM_RESERVED_IDS = 4
CTC_BLANK_ID = PAD_ID
