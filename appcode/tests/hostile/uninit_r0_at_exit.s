# expect: reject Uninit
exit
