"""Output: the record contract (``records``: one place names every field), the sinks that write records
(NDJSON, JSON, CSV), what a person reads on a terminal (``table``: the tables after a run; ``live_view``: the
view while `iotscan live` captures), the HTML report (``report``: the bounded summaries; ``report_html``: the
page; ``report_plots``: its figures, through matplotlib, imported only there) and the console (progress,
warnings, errors).

It imports nothing of iotscan but ``iotscan.errors``: any stage may import its records.
"""
