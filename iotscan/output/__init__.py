"""Output: the record contract (``records``: one place names every field), the sinks that write records
(NDJSON, JSON, CSV, tables), the HTML report (``report``: the bounded summaries; ``report_html``: the page;
``report_plots``: its figures, through matplotlib, imported only there) and the terminal console (progress,
warnings, errors).

It imports nothing of iotscan but ``iotscan.errors``: any stage may import its records.
"""
