"""`imagegpt app`: a local web page to complete and sample images with a model (gradio, the `app` extra).

core.py holds what the page calls (model loading, uploads within limits, views, streaming generation) and
imports no gradio; page.py builds the page from it. Only the public library is used, so the app sits
downstream of everything else.
"""
