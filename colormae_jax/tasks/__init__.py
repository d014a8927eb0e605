"""The tasks ``main`` runs, one module each: ``validate(config, num_devices, check_data)``
refuses a bad config before anything is compiled, ``train_and_evaluate(config, workdir,
devices=, stop_after=, deadline=)`` runs it on the shared loop (:mod:`colormae_jax.loop`)."""
