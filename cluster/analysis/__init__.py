"""Routing analysis, as in the Mixtral paper (section 5): which experts each domain's tokens use, and how often
consecutive tokens keep their experts.

    routing_stats.py  pure functions over expert ids [T, K]: shares, repetition rates, random baselines
    capture.py        record a text's routing from the model's observer hook (RoutedTokens)
    report.py         routing.json (pydantic)
    figures.py        the PNG figures (matplotlib)
    token_html.py     the text coloured by first-choice expert
    run.py            the offline analysis behind ``moeshard routing``
    live_window.py    repetition rates over a sliding window of live traffic (``/v1/experts``)
"""
