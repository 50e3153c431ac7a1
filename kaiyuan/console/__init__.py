"""The web console under /ui: overview, traffic, trials, keys, for the people who look, not read.

Pages are rendered on the server (Jinja2, autoescaped); charts are drawn by the vendored uPlot.
Every number comes from the admin API's data functions (:mod:`kaiyuan.console.data`), every
action is a call to the admin API itself, authenticated by :mod:`kaiyuan.console.access`.
"""
