"""The ``unbroken`` command line (:mod:`.main`) and the ``unbroken run`` supervisor (:mod:`.supervisor`).

Top layer: may import anything below.  Commands import the library when they run, so
``unbroken run`` and ``--help`` start without importing torch.
"""
