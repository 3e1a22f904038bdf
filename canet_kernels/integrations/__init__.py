"""Adapters that put canet into other sequential-recommendation code:
`sasrec` (SASRec.pytorch-style `log2feats`) and `recbole` (RecBole 1.2.1;
needs the optional `recbole` extra). Nothing in the core imports them."""
