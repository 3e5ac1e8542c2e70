"""Operations on adapter directories: the zero-delta twin (:mod:`.zero`)."""
