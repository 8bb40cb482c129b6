"""What the ``speech_to_text_gdps`` task adds to a batch's ``net_input``, read by the GDPS models:
the key is the contract between the task that fills it and the models that route by it."""

# (batch,) source-language ids, in the order of the task's languages
LANG_ID_KEY = "src_lang_id"
