"""``sea lab``: does SEA work? A synthetic world with renderer ground truth (:mod:`.world`), a tiny
CLIP trained on it (:mod:`.clip`), what every run shares (:mod:`.prepare`), the arms and their
evaluation (:mod:`.arms`), the results (:mod:`.results`) and the experiment (:mod:`.experiment`,
sized by :mod:`.plan`)."""
