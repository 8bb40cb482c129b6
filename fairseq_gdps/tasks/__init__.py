from fairseq_gdps.tasks import speech_to_text_gdps  # noqa: F401  (registers speech_to_text_gdps)
