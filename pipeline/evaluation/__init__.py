"""Scoring exported models: ``protocol`` (which comparisons, the report), ``embedding`` (sessions
to embeddings), ``submission`` (KVC test sets and prediction files), ``commands`` (the
``eerpipe evaluate`` and ``eerpipe predict`` flows). Exports themselves: :mod:`pipeline.exports`."""
